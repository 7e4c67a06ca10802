//! Where socket-level load balancing hooks in: the socket programs
//! (`programs::SOCK`) attached to one cgroup v2 directory, one pinned link
//! per hook under `<pin-dir>/links/cgroup/<hook>`. Every process in that
//! cgroup and below gets them; the programs themselves serve only clients
//! in the agent's network namespace (and pods with `--socket-lb-pods`).
//!
//! Like the TCX links, the pins keep the programs attached after the agent
//! exits, and a new agent swaps its programs into the existing links
//! atomically (`BPF_LINK_UPDATE`): no `connect()` ever runs without them.
//! A link pinned for another cgroup (the flag changed) is let go and the
//! programs attached to the new one.
//!
//! aya attaches and pins links but neither updates a cgroup link nor says
//! which cgroup a pinned one is on: those two calls are made here, with
//! `bpf(2)` directly.
use std::{
    fs, io,
    os::{
        fd::{AsFd as _, AsRawFd as _, BorrowedFd, FromRawFd as _, OwnedFd},
        unix::fs::MetadataExt as _,
    },
    path::{Path, PathBuf},
};

use aya::{
    Ebpf,
    programs::{CgroupAttachMode, CgroupSockAddr, links::FdLink},
};
use proxy_common::programs;

/// Where the host's cgroup v2 hierarchy is mounted: unified hosts, then
/// hybrid ones (systemd's legacy layout).
pub const DEFAULT_ROOTS: [&str; 2] = ["/sys/fs/cgroup", "/sys/fs/cgroup/unified"];

/// `statfs` magic of cgroup2.
const CGROUP2_SUPER_MAGIC: i64 = 0x6367_7270;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(
        "socket-level load balancing needs the host's cgroup v2 hierarchy, and none is mounted at {} in \
         this mount namespace (`ip netns exec` hides /sys/fs/cgroup); give --cgroup PATH, a cgroup v2 \
         directory whose processes should reach Services, or --cgroup none to run without it (processes \
         in the node's network namespace then cannot reach any Service)",
        DEFAULT_ROOTS.join(" or ")
    )]
    NoDefault,
    #[error("--cgroup {path}: not a cgroup v2 directory (filesystem magic {magic:#x}); cgroup v1 has no socket hooks")]
    NotCgroup2 { path: PathBuf, magic: i64 },
    #[error("--cgroup {path}: {op}: {source}")]
    Io { op: &'static str, path: PathBuf, source: io::Error },
    #[error("socket program {name}: {op}: {source}")]
    Program { name: &'static str, op: &'static str, source: Box<dyn std::error::Error + Send + Sync> },
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// `--cgroup` as given: a path, `none`, or nothing (the default root).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum Choice {
    /// The host's cgroup v2 root (`DEFAULT_ROOTS`).
    #[default]
    Root,
    /// No socket-level load balancing.
    Off,
    Path(PathBuf),
}

impl std::str::FromStr for Choice {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "" => Err("empty: give a cgroup v2 directory, or `none`".into()),
            "none" => Ok(Self::Off),
            p => Ok(Self::Path(PathBuf::from(p))),
        }
    }
}

/// The cgroup directory `choice` names (`None`: socket LB is off), checked
/// to be cgroup v2.
pub fn resolve(choice: &Choice) -> Result<Option<PathBuf>> {
    let path = match choice {
        Choice::Off => return Ok(None),
        Choice::Path(p) => p.clone(),
        Choice::Root => DEFAULT_ROOTS
            .iter()
            .map(PathBuf::from)
            .find(|p| magic(p).is_ok_and(|m| m == CGROUP2_SUPER_MAGIC))
            .ok_or(Error::NoDefault)?,
    };
    let m = magic(&path).map_err(|source| Error::Io { op: "statfs", path: path.clone(), source })?;
    if m != CGROUP2_SUPER_MAGIC {
        return Err(Error::NotCgroup2 { path, magic: m });
    }
    Ok(Some(path))
}

fn magic(path: &Path) -> io::Result<i64> {
    let c = std::ffi::CString::new(path.as_os_str().as_encoded_bytes())
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
    // SAFETY: `c` is a valid C string; `st` is a plain out-parameter.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    if unsafe { libc::statfs(c.as_ptr(), &raw mut st) } != 0 {
        return Err(io::Error::last_os_error());
    }
    #[expect(clippy::useless_conversion, reason = "f_type is i64 on x86_64 but not on every target")]
    Ok(i64::from(st.f_type))
}

/// The cookie of this process's network namespace: the socket programs
/// know host clients by it (`DatapathConfig::host_netns_cookie`).
pub fn netns_cookie() -> io::Result<u64> {
    // SAFETY: plain socket(2); the fd is owned right away.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` is a fresh descriptor nobody else owns.
    let sock = unsafe { OwnedFd::from_raw_fd(fd) };
    let mut cookie = 0u64;
    let mut len = libc::socklen_t::try_from(size_of::<u64>()).expect("8 fits");
    // SAFETY: getsockopt writes at most `len` bytes into `cookie`.
    let rc = unsafe {
        libc::getsockopt(
            sock.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_NETNS_COOKIE,
            (&raw mut cookie).cast(),
            &raw mut len,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(cookie)
}

/// The kernel's attach type of each hook (`enum bpf_attach_type`).
const fn attach_type(hook: &str) -> u32 {
    match hook.as_bytes() {
        b"connect4" => 10,
        b"connect6" => 11,
        b"sendmsg4" => 14,
        b"sendmsg6" => 15,
        b"recvmsg4" => 19,
        b"recvmsg6" => 20,
        b"getpeername4" => 29,
        b"getpeername6" => 30,
        _ => u32::MAX,
    }
}

/// What became of one hook's link.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Attached for the first time.
    Attached,
    /// A pinned link now runs the new program (`BPF_LINK_UPDATE`).
    Replaced,
    /// A link pinned for another cgroup was let go; attached here.
    Moved,
}

/// A socket program of a loaded object.
pub fn program<'a>(ebpf: &'a mut Ebpf, name: &'static str) -> Result<&'a mut CgroupSockAddr> {
    let prog = ebpf.program_mut(name).ok_or(Error::Program { name, op: "find", source: "not in the object".into() })?;
    prog.try_into().map_err(|e: aya::programs::ProgramError| Error::Program { name, op: "type", source: e.into() })
}

/// Each socket program's size: instructions verified, and after translation.
pub fn program_sizes(ebpf: &mut Ebpf) -> Result<Vec<(&'static str, u32, u32)>> {
    let mut out = Vec::new();
    for (_, name) in programs::SOCK {
        let info = program(ebpf, name)?.info().map_err(|e| Error::Program { name, op: "info", source: e.into() })?;
        out.push((name, info.verified_instruction_count().unwrap_or(0), info.size_translated().unwrap_or(0) / 8));
    }
    Ok(out)
}

/// Attach every socket program of `ebpf` to `cgroup`, one link per hook
/// pinned under `links`; a link already pinned there gets the new program.
pub fn attach(ebpf: &mut Ebpf, links: &Path, cgroup: &Path) -> Result<Vec<(&'static str, Outcome)>> {
    let io_err = |op: &'static str, path: &Path| {
        let path = path.to_owned();
        move |source| Error::Io { op, path, source }
    };
    fs::create_dir_all(links).map_err(io_err("create", links))?;
    let cgroup_id = fs::metadata(cgroup).map_err(io_err("stat", cgroup))?.ino();
    let mut out = Vec::new();
    for (hook, name) in programs::SOCK {
        let prog = program(ebpf, name)?;
        let pin = links.join(hook);
        let mut outcome = Outcome::Attached;
        if pin.exists() {
            match pinned_link(&pin) {
                Ok((link, info)) if info.cgroup_id == cgroup_id && info.attach_type == attach_type(hook) => {
                    let fd = prog.fd().map_err(|e| Error::Program { name, op: "fd", source: e.into() })?;
                    link_update(link.as_fd(), fd.as_fd()).map_err(|e| Error::Program {
                        name,
                        op: "BPF_LINK_UPDATE",
                        source: e.into(),
                    })?;
                    out.push((name, Outcome::Replaced));
                    continue;
                }
                // Another cgroup, or a link that is not ours: let it go.
                Ok(_) => outcome = Outcome::Moved,
                // The pin holds no usable link: drop it.
                Err(e) => {
                    log::warn!("socket program {name}: pinned link {} unusable ({e}); attaching anew", pin.display());
                }
            }
            fs::remove_file(&pin).map_err(io_err("unpin", &pin))?;
        }
        let dir = fs::File::open(cgroup).map_err(io_err("open", cgroup))?;
        let err = |op: &'static str| {
            move |e: Box<dyn std::error::Error + Send + Sync>| Error::Program { name, op, source: e }
        };
        let id = prog.attach(dir, CgroupAttachMode::Single).map_err(|e| err("attach")(e.into()))?;
        let link = prog.take_link(id).map_err(|e| err("take link")(e.into()))?;
        let fd = FdLink::try_from(link).map_err(|e| err("convert link")(e.into()))?;
        fd.pin(&pin).map_err(|e| err("pin link")(e.into()))?;
        out.push((name, outcome));
    }
    Ok(out)
}

// bpf(2) commands and the parts of their attributes used here
// (include/uapi/linux/bpf.h).
const BPF_OBJ_GET: libc::c_long = 7;
const BPF_OBJ_GET_INFO_BY_FD: libc::c_long = 15;
const BPF_LINK_UPDATE: libc::c_long = 29;
const BPF_LINK_TYPE_CGROUP: u32 = 3;

/// `union bpf_attr` for BPF_OBJ_GET.
#[repr(C)]
struct ObjGetAttr {
    pathname: u64,
    bpf_fd: u32,
    file_flags: u32,
    path_fd: i32,
}

/// `union bpf_attr` for BPF_OBJ_GET_INFO_BY_FD.
#[repr(C)]
struct InfoAttr {
    bpf_fd: u32,
    info_len: u32,
    info: u64,
}

/// `union bpf_attr` for BPF_LINK_UPDATE.
#[repr(C)]
struct LinkUpdateAttr {
    link_fd: u32,
    new_prog_fd: u32,
    flags: u32,
    old_prog_fd: u32,
}

/// The head of `struct bpf_link_info` with its cgroup member.
#[repr(C)]
#[derive(Default)]
struct CgroupLinkInfo {
    link_type: u32,
    id: u32,
    prog_id: u32,
    _pad: u32,
    cgroup_id: u64,
    attach_type: u32,
    _pad2: u32,
}

fn bpf<T>(cmd: libc::c_long, attr: &mut T) -> io::Result<i64> {
    // SAFETY: `attr` is a live, initialised `union bpf_attr` prefix of the
    // size passed; the kernel reads (and for info, writes through) it.
    let rc = unsafe { libc::syscall(libc::SYS_bpf, cmd, std::ptr::from_mut(attr), size_of::<T>()) };
    if rc < 0 { Err(io::Error::last_os_error()) } else { Ok(rc) }
}

/// Open the link pinned at `pin`, with its cgroup and attach type.
fn pinned_link(pin: &Path) -> io::Result<(OwnedFd, CgroupLinkInfo)> {
    let path = std::ffi::CString::new(pin.as_os_str().as_encoded_bytes())
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
    let mut get = ObjGetAttr { pathname: path.as_ptr() as u64, bpf_fd: 0, file_flags: 0, path_fd: 0 };
    let fd = i32::try_from(bpf(BPF_OBJ_GET, &mut get)?).map_err(io::Error::other)?;
    // SAFETY: BPF_OBJ_GET returned a new descriptor that we own.
    let link = unsafe { OwnedFd::from_raw_fd(fd) };
    let mut info = CgroupLinkInfo::default();
    let mut attr = InfoAttr {
        bpf_fd: u32::try_from(link.as_raw_fd()).map_err(io::Error::other)?,
        info_len: u32::try_from(size_of::<CgroupLinkInfo>()).map_err(io::Error::other)?,
        info: (&raw mut info) as u64,
    };
    bpf(BPF_OBJ_GET_INFO_BY_FD, &mut attr)?;
    if info.link_type != BPF_LINK_TYPE_CGROUP {
        info.cgroup_id = 0;
    }
    Ok((link, info))
}

/// Swap `prog` into `link`: the hook never runs without a program.
fn link_update(link: BorrowedFd<'_>, prog: BorrowedFd<'_>) -> io::Result<()> {
    let mut attr = LinkUpdateAttr {
        link_fd: u32::try_from(link.as_raw_fd()).map_err(io::Error::other)?,
        new_prog_fd: u32::try_from(prog.as_raw_fd()).map_err(io::Error::other)?,
        flags: 0,
        old_prog_fd: 0,
    };
    bpf(BPF_LINK_UPDATE, &mut attr).map(|_| ())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_flag_takes_a_path_or_none() {
        assert_eq!("none".parse::<Choice>(), Ok(Choice::Off));
        assert_eq!("/x/y".parse::<Choice>(), Ok(Choice::Path("/x/y".into())));
        assert!("".parse::<Choice>().is_err());
        assert_eq!(resolve(&Choice::Off).ok(), Some(None));
    }

    #[test]
    fn a_directory_that_is_not_cgroup2_is_refused_by_name() {
        let e = resolve(&Choice::Path(std::env::temp_dir())).expect_err("tmp is not cgroup2").to_string();
        assert!(e.contains("--cgroup") && e.contains("not a cgroup v2 directory"), "{e}");
        let e = resolve(&Choice::Path("/nonexistent/cg".into())).expect_err("missing").to_string();
        assert!(e.contains("/nonexistent/cg") && e.contains("statfs"), "{e}");
    }

    #[test]
    fn every_hook_has_its_attach_type() {
        for (hook, _) in programs::SOCK {
            assert_ne!(attach_type(hook), u32::MAX, "{hook}");
        }
    }
}
