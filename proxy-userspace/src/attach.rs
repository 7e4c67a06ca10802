//! Loading the datapath, attaching it through TCX, pinning, and clean-up.
//!
//! Layout under the pin directory (a bpffs):
//! - `maps/<NAME>`: every map, pinned by name; a new agent reuses them, so
//!   conntrack and service state survive restarts;
//! - `links/ingress/<ifname>`, `links/egress/<ifname>`: the TCX links of
//!   each attached interface (a `.` in the name is written `%2e`: bpffs
//!   refuses dots); they keep the programs attached after the agent exits. A restarted agent swaps its freshly loaded programs into
//!   the existing links atomically (`BPF_LINK_UPDATE`), so no packet sees a
//!   detached interface. Pins follow interfaces: an interface that goes
//!   away takes its pins (and its `IFACES` entry) with it;
//! - `links/cgroup/<hook>`: the socket programs' cgroup links (`cgroup`).
//!
//! Interfaces come in two roles: pod-facing ones (`--attach`), whose
//! clients are on this node, and node devices (`--devices`), the uplinks to
//! other nodes and external clients. Each gets the ingress program of its
//! role and the common egress program.
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
use proxy_common::{Sizing, iface_role, maps as spec, programs};

use crate::{
    cgroup,
    maps::{self, Maps},
};

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
    #[error("program {name}: {op}: {source}")]
    Program { name: &'static str, op: &'static str, source: aya::programs::ProgramError },
    #[error("interface {iface}: {op}: {source}")]
    Attach { iface: String, op: &'static str, source: Box<dyn std::error::Error + Send + Sync> },
    #[error("no interface matches {glob:?} in this network namespace")]
    NoInterface { glob: String },
    #[error(transparent)]
    Maps(#[from] maps::Error),
    #[error(transparent)]
    Cgroup(#[from] cgroup::Error),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Map capacities per family, by what sizes them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Capacities {
    pub svc: u32,
    pub backend: u32,
    pub revnat: u32,
    pub ct: u32,
    pub affinity: u32,
    pub sock: u32,
}

impl Default for Capacities {
    fn default() -> Self {
        let d = Sizing::default_capacity;
        Self {
            svc: d(Sizing::Svc),
            backend: d(Sizing::Backend),
            revnat: d(Sizing::RevNat),
            ct: d(Sizing::Ct),
            affinity: d(Sizing::Affinity),
            sock: d(Sizing::Sock),
        }
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
            Sizing::Affinity => Some(self.affinity),
            Sizing::Sock => Some(self.sock),
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

/// Where the socket programs' cgroup links are pinned.
pub fn cgroup_links_dir(pin_dir: &Path) -> PathBuf {
    links_dir(pin_dir).join("cgroup")
}

/// What an attached interface faces.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    /// The host side of a pod's interface: clients here are on this node.
    Pod,
    /// A node device (uplink): other nodes and external clients.
    Device,
}

impl Role {
    /// The TC ingress program of this role.
    pub const fn program(self) -> &'static str {
        match self {
            Role::Pod => programs::FROM_POD,
            Role::Device => programs::FROM_DEVICE,
        }
    }

    /// The datapath's `iface_role` number.
    pub const fn number(self) -> u32 {
        match self {
            Role::Pod => iface_role::POD,
            Role::Device => iface_role::DEVICE,
        }
    }

    pub const fn name(self) -> &'static str {
        match self {
            Role::Pod => "pod",
            Role::Device => "device",
        }
    }
}

/// Which interfaces to attach to, by name (shell globs, commas separate
/// alternatives).
#[derive(Clone, Debug, Default)]
pub struct Selection {
    /// Pod-facing interfaces.
    pub pods: String,
    /// Node devices.
    pub devices: Option<String>,
}

impl Selection {
    /// The role of interface `name`, if it is selected (pods win a tie).
    pub fn role(&self, name: &str) -> Option<Role> {
        if glob_match(&self.pods, name) {
            Some(Role::Pod)
        } else if self.devices.as_deref().is_some_and(|d| glob_match(d, name)) {
            Some(Role::Device)
        } else {
            None
        }
    }

    /// The globs, for messages.
    pub fn describe(&self) -> String {
        match &self.devices {
            Some(d) => format!("pods {:?}, devices {d:?}", self.pods),
            None => format!("pods {:?}", self.pods),
        }
    }
}

/// The TC programs, by name.
const TC_PROGRAMS: [&str; 3] = [programs::FROM_POD, programs::FROM_DEVICE, programs::EGRESS];

/// Load the datapath with its maps pinned under `pin_dir` (reusing maps
/// already pinned there) and its programs loaded into the kernel.
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
    // BTF maps carry no pinning attribute: name their pins here.
    for name in spec::SOCKET_STORAGE {
        loader.map_pin_path(name, maps.join(name));
    }
    let mut ebpf = loader.load(DATAPATH)?;
    for name in TC_PROGRAMS {
        let prog = program(&mut ebpf, name)?;
        retry_load(|| prog.load()).map_err(|source| Error::Program { name, op: "load", source })?;
    }
    for (_, name) in programs::SOCK {
        let prog = cgroup::program(&mut ebpf, name)?;
        retry_load(|| prog.load()).map_err(|source| Error::Program { name, op: "load", source })?;
    }
    let maps = Maps::take(&mut ebpf)?;
    Ok((ebpf, maps))
}

/// Load one program. The verifier gives up with EAGAIN when a signal
/// arrives while it works (a large program takes it a while); libbpf
/// tries such a load again, up to five times, and so do we.
fn retry_load(
    mut load: impl FnMut() -> std::result::Result<(), aya::programs::ProgramError>,
) -> std::result::Result<(), aya::programs::ProgramError> {
    let mut attempts = 5;
    loop {
        match load() {
            Err(aya::programs::ProgramError::LoadError { io_error, .. })
                if io_error.kind() == std::io::ErrorKind::WouldBlock && attempts > 1 =>
            {
                attempts -= 1;
            }
            other => return other,
        }
    }
}

/// A TC program of a loaded object.
pub fn program<'a>(ebpf: &'a mut Ebpf, name: &'static str) -> Result<&'a mut SchedClassifier> {
    let prog = ebpf.program_mut(name).ok_or(Error::Program {
        name,
        op: "find",
        source: aya::programs::ProgramError::NotLoaded,
    })?;
    prog.try_into().map_err(|source| Error::Program { name, op: "type", source })
}

/// Each loaded program's size (TC, then socket programs): instructions the
/// verifier processed, and instructions after the kernel's translation.
pub fn program_sizes(ebpf: &mut Ebpf) -> Result<Vec<(&'static str, u32, u32)>> {
    let mut out = Vec::new();
    for name in TC_PROGRAMS {
        let info = program(ebpf, name)?.info().map_err(|source| Error::Program { name, op: "info", source })?;
        out.push((name, info.verified_instruction_count().unwrap_or(0), info.size_translated().unwrap_or(0) / 8));
    }
    out.extend(cgroup::program_sizes(ebpf)?);
    Ok(out)
}

/// Interfaces of the current network namespace: name and index.
pub fn interfaces() -> Result<Vec<(String, u32)>> {
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
            out.push((CStr::from_ptr((*p).if_name).to_string_lossy().into_owned(), (*p).if_index));
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
    glob.split(',').any(|g| !g.trim().is_empty() && one(g.trim().as_bytes(), name.as_bytes()))
}

/// An interface the datapath is attached to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Attached {
    pub name: String,
    pub ifindex: u32,
    pub role: Role,
}

/// What changed in one pass over the interfaces.
#[derive(Debug, Default)]
pub struct Changes {
    pub attached: Vec<Attached>,
    pub gone: Vec<Attached>,
    pub errors: Vec<Error>,
}

/// Bring the attachments in line with the interfaces present: attach the
/// programs of its role to every selected interface not attached yet
/// (pinning the links and recording it in `IFACES`), and forget the ones
/// that are gone (their pins and entries go with them). An interface that
/// vanishes meanwhile is reported and skipped.
pub fn reconcile(
    ebpf: &mut Ebpf,
    maps: &mut Maps,
    pin_dir: &Path,
    sel: &Selection,
    attached: &mut Vec<Attached>,
) -> Result<Changes> {
    let links = links_dir(pin_dir);
    fs::create_dir_all(&links).map_err(io_err("create", &links))?;
    let present = interfaces()?;
    let mut changes = Changes::default();
    // Gone, or recreated under the same name with another index.
    let (keep, gone): (Vec<Attached>, Vec<Attached>) = std::mem::take(attached)
        .into_iter()
        .partition(|a| present.iter().any(|(n, i)| *n == a.name && *i == a.ifindex));
    *attached = keep;
    for a in gone {
        for dir in ["ingress", "egress"] {
            let pin = link_pin(&links, dir, &a.name);
            // The link died with its interface; its pin is all that is left.
            if let Err(e) = fs::remove_file(&pin)
                && e.kind() != io::ErrorKind::NotFound
            {
                changes.errors.push(io_err("unpin", &pin)(e));
            }
        }
        if let Err(e) = maps.remove_iface(a.ifindex) {
            changes.errors.push(e.into());
        }
        changes.gone.push(a);
    }
    for (name, ifindex) in present {
        let Some(role) = sel.role(&name) else { continue };
        if attached.iter().any(|a| a.name == name) {
            continue;
        }
        let a = Attached { name, ifindex, role };
        match attach_one(ebpf, &links, &a) {
            Ok(()) => {
                if let Err(e) = maps.set_iface(ifindex, role.number()) {
                    changes.errors.push(e.into());
                    continue;
                }
                attached.push(a.clone());
                changes.attached.push(a);
            }
            Err(e) => changes.errors.push(e),
        }
    }
    Ok(changes)
}

/// Where the link of interface `name` at hook `dir` is pinned.
fn link_pin(links: &Path, dir: &str, name: &str) -> PathBuf {
    links.join(dir).join(name.replace('%', "%25").replace('.', "%2e"))
}

fn attach_one(ebpf: &mut Ebpf, links: &Path, a: &Attached) -> Result<()> {
    for dir in ["ingress", "egress"] {
        let d = links.join(dir);
        fs::create_dir_all(&d).map_err(io_err("create", &d))?;
    }
    // A link pinned by an agent from before ingress and egress were apart.
    let legacy = links.join(&a.name);
    if legacy.is_file() {
        let ingress = link_pin(links, "ingress", &a.name);
        fs::rename(&legacy, &ingress).map_err(io_err("rename", &legacy))?;
    }
    for (dir, attach_type, name) in
        [("ingress", TcAttachType::Ingress, a.role.program()), ("egress", TcAttachType::Egress, programs::EGRESS)]
    {
        let prog = program(ebpf, name)?;
        attach_link(prog, &link_pin(links, dir, &a.name), &a.name, attach_type)?;
    }
    Ok(())
}

fn attach_link(prog: &mut SchedClassifier, pin: &Path, iface: &str, attach_type: TcAttachType) -> Result<()> {
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
    let op = match attach_type {
        TcAttachType::Egress => "attach tcx egress",
        _ => "attach tcx ingress",
    };
    let id = prog
        .attach_with_options(iface, attach_type, TcAttachOptions::TcxOrder(LinkOrder::default()))
        .map_err(|e| err(op)(e.into()))?;
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
    let links = links_dir(pin_dir);
    for dir in [links.join("ingress"), links.join("egress"), cgroup_links_dir(pin_dir), links, maps_dir(pin_dir)] {
        let Ok(entries) = fs::read_dir(&dir) else { continue };
        for entry in entries {
            let path = entry.map_err(io_err("read", &dir))?.path();
            if path.is_dir() {
                continue; // emptied on its own turn
            }
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
