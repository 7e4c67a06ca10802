//! Loading the datapath, attaching it through TCX, pinning, and clean-up.
//!
//! Layout under the pin directory (a bpffs):
//! - `maps/<NAME>`: every map, pinned by name; a new agent reuses them, so
//!   conntrack and service state survive restarts;
//! - `links/<ifname>`: one TCX ingress link per interface; it keeps the
//!   program attached after the agent exits. A restarted agent swaps its
//!   freshly loaded program into the existing link atomically
//!   (`BPF_LINK_UPDATE`), so no packet sees a detached interface.
use std::{
    ffi::CStr,
    fs, io,
    path::{Path, PathBuf},
};

use aya::{
    Ebpf, EbpfLoader,
    programs::{
        LinkOrder, SchedClassifier, TcAttachType,
        links::{FdLink, PinnedLink},
        tc::{SchedClassifierLink, TcAttachOptions},
    },
};
use proxy_common::{PROGRAM_NAME, Sizing, maps as spec};

use crate::maps::{self, Maps};

/// The datapath object, built by build.rs with the nightly toolchain.
pub static DATAPATH: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/dsproxy-tc"));

/// `statfs` magic of a bpffs.
const BPF_FS_MAGIC: i64 = 0xcafe_4a11;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(
        "pin directory {path} is not on a bpffs (found filesystem magic {magic:#x}). \
         Mount one and point --pin-dir at it, e.g. `mount -t bpf bpf /sys/fs/bpf`. \
         Under `ip netns exec`, /sys is private to the command and vanishes with it: \
         mount a bpffs outside /sys in the host's mount namespace \
         (`mkdir -p /run/dsproxy/bpf && mount -t bpf bpf /run/dsproxy/bpf`) \
         and pass `--pin-dir /run/dsproxy/bpf/dsproxy`"
    )]
    NotBpffs { path: PathBuf, magic: i64 },
    #[error("{op} {path}: {source}")]
    Io { op: &'static str, path: PathBuf, source: io::Error },
    #[error("loading the datapath: {0}")]
    Load(#[from] aya::EbpfError),
    #[error("program {PROGRAM_NAME}: {op}: {source}")]
    Program { op: &'static str, source: aya::programs::ProgramError },
    #[error("interface {iface}: {op}: {source}")]
    Attach { iface: String, op: &'static str, source: Box<dyn std::error::Error + Send + Sync> },
    #[error("no interface matches {glob:?} in this network namespace")]
    NoInterface { glob: String },
    #[error(transparent)]
    Maps(#[from] maps::Error),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Map capacities per family, by what sizes them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Capacities {
    pub svc: u32,
    pub backend: u32,
    pub revnat: u32,
    pub ct: u32,
}

impl Default for Capacities {
    fn default() -> Self {
        let d = Sizing::default_capacity;
        Self { svc: d(Sizing::Svc), backend: d(Sizing::Backend), revnat: d(Sizing::RevNat), ct: d(Sizing::Ct) }
    }
}

impl Capacities {
    /// The capacity `sizing` asks for; `None` for maps of fixed size.
    pub const fn get(&self, sizing: Sizing) -> Option<u32> {
        match sizing {
            Sizing::Svc => Some(self.svc),
            Sizing::Backend => Some(self.backend),
            Sizing::RevNat => Some(self.revnat),
            Sizing::Ct => Some(self.ct),
            Sizing::Fixed => None,
        }
    }
}

fn io_err(op: &'static str, path: &Path) -> impl FnOnce(io::Error) -> Error + use<> {
    let path = path.to_owned();
    move |source| Error::Io { op, path, source }
}

/// Fail unless `dir` (or its nearest existing ancestor) is on a bpffs.
pub fn check_bpffs(dir: &Path) -> Result<()> {
    let mut probe = dir;
    while !probe.exists() {
        probe = probe.parent().unwrap_or(Path::new("/"));
    }
    let c = std::ffi::CString::new(probe.as_os_str().as_encoded_bytes()).expect("path without NUL");
    // SAFETY: `c` is a valid C string; `st` is a plain out-parameter.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    if unsafe { libc::statfs(c.as_ptr(), &raw mut st) } != 0 {
        return Err(io_err("statfs", probe)(io::Error::last_os_error()));
    }
    #[expect(clippy::useless_conversion, reason = "f_type is i64 on x86_64 but not on every target")]
    let magic = i64::from(st.f_type);
    if magic != BPF_FS_MAGIC {
        return Err(Error::NotBpffs { path: dir.to_owned(), magic });
    }
    Ok(())
}

fn maps_dir(pin_dir: &Path) -> PathBuf {
    pin_dir.join("maps")
}

fn links_dir(pin_dir: &Path) -> PathBuf {
    pin_dir.join("links")
}

/// Load the datapath with its maps pinned under `pin_dir` (reusing maps
/// already pinned there) and the program loaded into the kernel.
pub fn load(pin_dir: &Path, caps: &Capacities) -> Result<(Ebpf, Maps)> {
    check_bpffs(pin_dir)?;
    let maps = maps_dir(pin_dir);
    fs::create_dir_all(&maps).map_err(io_err("create", &maps))?;
    let mut loader = EbpfLoader::new();
    loader.default_map_pin_directory(&maps);
    for m in &spec::ALL {
        if let Some(n) = caps.get(m.sizing) {
            loader.map_max_entries(m.name, n);
        }
    }
    let mut ebpf = loader.load(DATAPATH)?;
    program(&mut ebpf)?.load().map_err(|source| Error::Program { op: "load", source })?;
    let maps = Maps::take(&mut ebpf)?;
    Ok((ebpf, maps))
}

/// The TC program of a loaded object.
pub fn program(ebpf: &mut Ebpf) -> Result<&mut SchedClassifier> {
    let prog = ebpf
        .program_mut(PROGRAM_NAME)
        .ok_or(Error::Program { op: "find", source: aya::programs::ProgramError::NotLoaded })?;
    prog.try_into().map_err(|source| Error::Program { op: "type", source })
}

/// The loaded program's size: instructions the verifier processed, and
/// instructions after the kernel's translation.
pub fn program_size(ebpf: &mut Ebpf) -> Result<(u32, u32)> {
    let info = program(ebpf)?.info().map_err(|source| Error::Program { op: "info", source })?;
    Ok((info.verified_instruction_count().unwrap_or(0), info.size_translated().unwrap_or(0) / 8))
}

/// Interfaces of the current network namespace.
pub fn interfaces() -> Result<Vec<String>> {
    // SAFETY: if_nameindex returns a heap array terminated by a zero entry,
    // freed below with if_freenameindex; names are valid C strings. It asks
    // the kernel over netlink, so it sees this network namespace even where
    // /sys belongs to another.
    unsafe {
        let head = libc::if_nameindex();
        if head.is_null() {
            return Err(io_err("if_nameindex", Path::new("-"))(io::Error::last_os_error()));
        }
        let mut out = Vec::new();
        let mut p = head;
        while (*p).if_index != 0 {
            out.push(CStr::from_ptr((*p).if_name).to_string_lossy().into_owned());
            p = p.add(1);
        }
        libc::if_freenameindex(head);
        Ok(out)
    }
}

/// Shell-style match with `*` and `?`; `glob` may list alternatives
/// separated by commas.
pub fn glob_match(glob: &str, name: &str) -> bool {
    fn one(p: &[u8], s: &[u8]) -> bool {
        match (p.first(), s.first()) {
            (None, None) => true,
            (Some(b'*'), _) => one(&p[1..], s) || (!s.is_empty() && one(p, &s[1..])),
            (Some(b'?'), Some(_)) => one(&p[1..], &s[1..]),
            (Some(a), Some(b)) if a == b => one(&p[1..], &s[1..]),
            _ => false,
        }
    }
    glob.split(',').any(|g| one(g.trim().as_bytes(), name.as_bytes()))
}

/// Attach the loaded program at ingress of every interface matching `glob`
/// that is not attached by this object yet, pinning each link. Returns the
/// interfaces newly attached. An interface that vanishes meanwhile is
/// reported and skipped.
pub fn attach_matching(
    ebpf: &mut Ebpf,
    pin_dir: &Path,
    glob: &str,
    attached: &mut Vec<String>,
) -> Result<(Vec<String>, Vec<Error>)> {
    let links = links_dir(pin_dir);
    fs::create_dir_all(&links).map_err(io_err("create", &links))?;
    let prog = program(ebpf)?;
    let mut new = Vec::new();
    let mut errors = Vec::new();
    for iface in interfaces()? {
        if !glob_match(glob, &iface) || attached.contains(&iface) {
            continue;
        }
        match attach_one(prog, &links.join(&iface), &iface) {
            Ok(()) => {
                attached.push(iface.clone());
                new.push(iface);
            }
            Err(e) => errors.push(e),
        }
    }
    if attached.is_empty() && errors.is_empty() {
        return Err(Error::NoInterface { glob: glob.to_owned() });
    }
    Ok((new, errors))
}

fn attach_one(prog: &mut SchedClassifier, pin: &Path, iface: &str) -> Result<()> {
    let err = |op: &'static str| {
        move |e: Box<dyn std::error::Error + Send + Sync>| Error::Attach { iface: iface.to_owned(), op, source: e }
    };
    if pin.exists() {
        // A previous agent left a link: swap our program into it.
        match replace_in_pinned(prog, pin) {
            Ok(()) => return Ok(()),
            Err(e) => {
                // The link died with its interface (a pod's veth deleted and
                // recreated under the same name): drop the stale pin and
                // attach afresh.
                log::warn!("interface {iface}: pinned link {} unusable ({e}); attaching anew", pin.display());
                fs::remove_file(pin).map_err(io_err("unpin", pin))?;
            }
        }
    }
    let id = prog
        .attach_with_options(iface, TcAttachType::Ingress, TcAttachOptions::TcxOrder(LinkOrder::default()))
        .map_err(|e| err("attach tcx ingress")(e.into()))?;
    let link = prog.take_link(id).map_err(|e| err("take link")(e.into()))?;
    let fd = FdLink::try_from(link).map_err(|e| err("convert link")(e.into()))?;
    fd.pin(pin).map_err(|e| err("pin link")(e.into()))?;
    Ok(())
}

fn replace_in_pinned(prog: &mut SchedClassifier, pin: &Path) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    let link = PinnedLink::from_pin(pin)?;
    let link = SchedClassifierLink::try_from(FdLink::from(link))?;
    let id = prog.attach_to_link(link)?;
    // The pin holds the link; our handle can go.
    drop(prog.take_link(id)?);
    Ok(())
}

/// Detach and unpin everything under `pin_dir` (kube-proxy's `--cleanup`).
/// Missing pieces are not an error: clean-up is idempotent.
pub fn cleanup(pin_dir: &Path) -> Result<Vec<PathBuf>> {
    let mut removed = Vec::new();
    if !pin_dir.exists() {
        return Ok(removed);
    }
    check_bpffs(pin_dir)?;
    for dir in [links_dir(pin_dir), maps_dir(pin_dir)] {
        let Ok(entries) = fs::read_dir(&dir) else { continue };
        for entry in entries {
            let path = entry.map_err(io_err("read", &dir))?.path();
            // Removing a link's pin drops its last reference: the kernel
            // detaches it. Removing a map's pin frees it once unused.
            fs::remove_file(&path).map_err(io_err("unpin", &path))?;
            removed.push(path);
        }
        fs::remove_dir(&dir).map_err(io_err("remove", &dir))?;
    }
    // The pin dir itself goes only when empty: never remove what we did not make.
    if fs::read_dir(pin_dir).is_ok_and(|mut d| d.next().is_none()) {
        fs::remove_dir(pin_dir).map_err(io_err("remove", pin_dir))?;
    }
    Ok(removed)
}
