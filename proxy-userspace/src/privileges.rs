//! The capabilities dsproxy needs, checked before anything touches the
//! kernel: a missing one is named in one line, instead of surfacing as a
//! verifier dump or an `EPERM` from deep inside the loader.
//!
//! Measured on Linux 6.18 by running the agent with one capability taken
//! out of its bounding set (the tests do this with `setpriv`):
//! - `CAP_BPF`: creating the maps, loading the program and BTF, reading
//!   pinned maps (`status`, `inspect`);
//! - `CAP_PERFMON`: without it the verifier rejects the datapath (its
//!   packet pointer arithmetic counts as a pointer leak);
//! - `CAP_NET_ADMIN`: loading a TC program and attaching it through TCX.
//!
//! Loading and attaching `cgroup/connect*` programs (socket load balancing)
//! needs `CAP_BPF` and `CAP_NET_ADMIN` too, and no `CAP_SYS_ADMIN`.
//! `CAP_SYS_ADMIN` implies `CAP_BPF` and `CAP_PERFMON` (kernels before 5.8
//! knew only it), so it is accepted in their place.
use std::fmt;

pub const CAP_NET_ADMIN: u32 = 12;
pub const CAP_SYS_ADMIN: u32 = 21;
pub const CAP_PERFMON: u32 = 38;
pub const CAP_BPF: u32 = 39;

/// One capability a command needs, and why.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Need {
    pub cap: u32,
    /// `CAP_BPF`.
    pub name: &'static str,
    /// The name in a Kubernetes `securityContext.capabilities.add`.
    pub k8s: &'static str,
    pub why: &'static str,
    /// `CAP_SYS_ADMIN` grants it as well.
    pub sys_admin_will_do: bool,
}

const BPF: Need = Need {
    cap: CAP_BPF,
    name: "CAP_BPF",
    k8s: "BPF",
    why: "to create maps and load programs",
    sys_admin_will_do: true,
};
const PERFMON: Need = Need {
    cap: CAP_PERFMON,
    name: "CAP_PERFMON",
    k8s: "PERFMON",
    why: "without it the verifier rejects the datapath",
    sys_admin_will_do: true,
};
const NET_ADMIN: Need = Need {
    cap: CAP_NET_ADMIN,
    name: "CAP_NET_ADMIN",
    k8s: "NET_ADMIN",
    why: "to attach to interfaces",
    sys_admin_will_do: false,
};
const READ_MAPS: Need = Need { why: "to read the pinned BPF maps", ..BPF };

/// What `dsproxy run` and `dsproxy load` need.
pub const RUN: [Need; 3] = [BPF, PERFMON, NET_ADMIN];
/// What `status` and `inspect` need.
pub const READ: [Need; 1] = [READ_MAPS];

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("reading this process's capabilities from /proc/self/status: {0}")]
    Proc(String),
    #[error("{0}")]
    Missing(Missing),
}

/// The capabilities a command lacks: rendered as one line.
#[derive(Debug, PartialEq, Eq)]
pub struct Missing {
    pub command: &'static str,
    pub missing: Vec<Need>,
}

impl fmt::Display for Missing {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let list: Vec<String> = self.missing.iter().map(|n| format!("{} ({})", n.name, n.why)).collect();
        let k8s: Vec<&str> = self.missing.iter().map(|n| n.k8s).collect();
        write!(
            f,
            "{} is missing {}: run it as root, or grant {} (in Kubernetes: securityContext.capabilities.add: [{}])",
            self.command,
            list.join(", "),
            if self.missing.len() == 1 { "it" } else { "them" },
            k8s.join(", ")
        )
    }
}

/// The effective capability set of this process.
pub fn effective() -> Result<u64, Error> {
    let status = std::fs::read_to_string("/proc/self/status").map_err(|e| Error::Proc(e.to_string()))?;
    parse_cap_eff(&status).ok_or_else(|| Error::Proc("no readable CapEff line".into()))
}

fn parse_cap_eff(status: &str) -> Option<u64> {
    let hex = status.lines().find_map(|l| l.strip_prefix("CapEff:"))?;
    u64::from_str_radix(hex.trim(), 16).ok()
}

/// The needs that `have` (an effective set) does not cover.
pub fn missing(have: u64, needs: &[Need]) -> Vec<Need> {
    let has = |cap: u32| have & (1u64 << cap) != 0;
    needs.iter().filter(|n| !(has(n.cap) || (n.sys_admin_will_do && has(CAP_SYS_ADMIN)))).copied().collect()
}

/// Fail, naming every missing capability, unless this process has `needs`.
pub fn check(command: &'static str, needs: &[Need]) -> Result<(), Error> {
    let missing = missing(effective()?, needs);
    if missing.is_empty() { Ok(()) } else { Err(Error::Missing(Missing { command, missing })) }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ALL: u64 = 0x1ff_ffff_ffff;

    #[test]
    fn cap_eff_is_read_from_proc_status() {
        let status = "Name:\tdsproxy\nCapInh:\t0000000000000000\nCapEff:\t000001ffffffffff\nCapBnd:\t0\n";
        assert_eq!(parse_cap_eff(status), Some(ALL));
        assert_eq!(parse_cap_eff("Name: x\n"), None);
    }

    #[test]
    fn every_missing_capability_is_named_in_one_line() {
        let have = ALL & !(1 << CAP_PERFMON) & !(1 << CAP_SYS_ADMIN) & !(1 << CAP_NET_ADMIN);
        let m = Missing { command: "dsproxy run", missing: missing(have, &RUN) };
        let text = m.to_string();
        assert!(!text.contains('\n'));
        assert!(text.contains("CAP_PERFMON") && text.contains("CAP_NET_ADMIN") && !text.contains("CAP_BPF "), "{text}");
        assert!(text.contains("capabilities.add: [PERFMON, NET_ADMIN]"), "{text}");
    }

    #[test]
    fn sys_admin_stands_in_for_bpf_and_perfmon_but_not_net_admin() {
        let have = (1 << CAP_SYS_ADMIN) | (1 << CAP_NET_ADMIN);
        assert!(missing(have, &RUN).is_empty());
        assert_eq!(missing(1 << CAP_SYS_ADMIN, &RUN), vec![NET_ADMIN]);
        assert_eq!(missing(0, &READ), vec![READ_MAPS]);
        assert!(missing(1 << CAP_BPF, &READ).is_empty());
    }
}
