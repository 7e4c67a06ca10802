//! `healthCheckNodePort` servers (kube-proxy's `service_health.go`): one
//! HTTP server per port in `Desired::health_checks`, on every address of
//! both families or, with `--nodeport-addresses`, on the node addresses it
//! selects (`Desired::health_check_addresses`), opened and closed as
//! Services come and go. Any path
//! gets the same answer: 200 when this node has ready endpoints of the
//! Service and the proxy is healthy, else 503; the body is kube-proxy's,
//! byte for byte, and `X-Load-Balancing-Endpoint-Weight` carries the count.
use std::{
    collections::BTreeMap,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    sync::{Arc, Mutex},
};

use tokio::{net::TcpListener, task::JoinHandle};

use crate::{
    health::ProxyHealth,
    http::{self, Handler, Response},
    types::{Family, HealthCheck},
};

/// kube-proxy's body: tabs, no trailing newline, Go-quoted strings.
pub fn body(service: &str, local_endpoints: usize, proxy_healthy: bool) -> String {
    let (ns, name) = service.split_once('/').unwrap_or(("", service));
    let q = |s: &str| serde_json::to_string(s).unwrap_or_default();
    format!(
        "{{\n\t\"service\": {{\n\t\t\"namespace\": {},\n\t\t\"name\": {}\n\t}},\n\t\"localEndpoints\": {local_endpoints},\n\t\"serviceProxyHealthy\": {proxy_healthy}\n}}",
        q(ns),
        q(name)
    )
}

/// The ready local endpoints of `check` that a server of `family` counts:
/// kube-proxy runs one health server per family, each counting the
/// endpoints of its own family.
pub fn count(check: &HealthCheck, family: Family) -> usize {
    check.by_family.iter().find(|(f, _)| *f == family).map_or(check.local_endpoints, |(_, n)| *n)
}

/// The answer for one health check, from a server of `family`.
pub fn response(check: &HealthCheck, family: Family, proxy_healthy: bool) -> Response {
    let n = count(check, family);
    let ok = n > 0 && proxy_healthy;
    let mut r = Response::new(if ok { 200 } else { 503 }, "application/json", body(&check.service, n, proxy_healthy));
    r.headers.push(("X-Load-Balancing-Endpoint-Weight", n.to_string()));
    r
}

/// The families `check` is served on: those the Service has a ClusterIP
/// of (both when the model does not say).
fn families(check: &HealthCheck) -> Vec<Family> {
    if check.by_family.is_empty() { Family::ALL.to_vec() } else { check.by_family.iter().map(|(f, _)| *f).collect() }
}

/// What the servers answer, by port; shared with their handlers.
type Checks = Arc<Mutex<BTreeMap<u16, HealthCheck>>>;

/// The running servers.
pub struct Servers {
    /// The addresses every port listens on (of the families it serves).
    addrs: Vec<IpAddr>,
    checks: Checks,
    proxy: Arc<ProxyHealth>,
    /// (port, family) -> its listeners' tasks.
    running: BTreeMap<(u16, Family), Vec<JoinHandle<()>>>,
    /// Listeners that failed to open, with the error last logged.
    failed: BTreeMap<(u16, Family), String>,
}

impl Drop for Servers {
    fn drop(&mut self) {
        for t in self.running.values().flatten() {
            t.abort();
        }
    }
}

/// A listener on `addr`; IPv6 sockets take IPv6 only, so both families
/// can listen on the same port. `SO_REUSEPORT` lets the listeners of new
/// addresses bind while those of the old ones are still being closed
/// (their tasks end when the runtime next polls them).
pub fn listen(addr: SocketAddr) -> std::io::Result<TcpListener> {
    use std::os::fd::AsRawFd as _;

    use socket2::{Domain, Socket, Type};
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, None)?;
    if addr.is_ipv6() {
        socket.set_only_v6(true)?;
    }
    socket.set_reuse_address(true)?;
    let one: libc::c_int = 1;
    // SAFETY: a valid socket and a pointer to an int of the size given.
    let rc = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_REUSEPORT,
            std::ptr::from_ref(&one).cast(),
            libc::socklen_t::try_from(size_of::<libc::c_int>()).unwrap_or(4),
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    socket.listen(1024)?;
    TcpListener::from_std(socket.into())
}

impl Servers {
    /// Servers listening on every address of both families.
    pub fn new(proxy: Arc<ProxyHealth>) -> Self {
        Self::on(vec![Ipv4Addr::UNSPECIFIED.into(), Ipv6Addr::UNSPECIFIED.into()], proxy)
    }

    /// Servers listening on `addrs` only.
    pub fn on(addrs: Vec<IpAddr>, proxy: Arc<ProxyHealth>) -> Self {
        Self { addrs, checks: Arc::default(), proxy, running: BTreeMap::new(), failed: BTreeMap::new() }
    }

    /// The ports being served, with the families each is served on.
    pub fn ports(&self) -> Vec<(u16, Family)> {
        self.running.keys().copied().collect()
    }

    fn handler(&self, port: u16, family: Family) -> Handler {
        let checks = Arc::clone(&self.checks);
        let proxy = Arc::clone(&self.proxy);
        Arc::new(move |_path| {
            let check = checks.lock().unwrap_or_else(std::sync::PoisonError::into_inner).get(&port).cloned();
            match check {
                Some(c) => response(&c, family, proxy.healthy()),
                // Closed while a kept-alive connection was still open.
                None => Response::new(503, "text/plain; charset=utf-8", "no health check on this port\n".into()),
            }
        })
    }

    /// Listen on `addrs` from now on (`None`: every address of both
    /// families); when they change, every port is reopened at the next
    /// `sync`.
    pub fn listen_on(&mut self, addrs: Option<&[IpAddr]>) {
        let addrs =
            addrs.map_or_else(|| vec![Ipv4Addr::UNSPECIFIED.into(), Ipv6Addr::UNSPECIFIED.into()], <[_]>::to_vec);
        if addrs == self.addrs {
            return;
        }
        for t in self.running.values().flatten() {
            t.abort();
        }
        self.running.clear();
        self.failed.clear();
        log::info!("health check node ports listen on {addrs:?}");
        self.addrs = addrs;
    }

    /// Serve exactly `wanted`: open new ports, close those that went, and
    /// answer with the new counts at once. A port that cannot be opened
    /// is logged once and tried again at the next sync.
    pub fn sync(&mut self, wanted: &BTreeMap<u16, HealthCheck>) {
        *self.checks.lock().unwrap_or_else(std::sync::PoisonError::into_inner) = wanted.clone();
        let keys: BTreeMap<(u16, Family), &HealthCheck> =
            wanted.iter().flat_map(|(p, c)| families(c).into_iter().map(move |f| ((*p, f), c))).collect();
        self.running.retain(|(port, family), tasks| {
            let keep = keys.contains_key(&(*port, *family));
            if !keep {
                for t in tasks.iter() {
                    t.abort();
                }
                log::info!("health check node port {port} ({}): closed", family.k8s_name());
            }
            keep
        });
        self.failed.retain(|k, _| keys.contains_key(k));
        for (&(port, family), check) in &keys {
            if self.running.contains_key(&(port, family)) {
                continue;
            }
            let mut tasks = Vec::new();
            let mut errors = Vec::new();
            for ip in self.addrs.iter().filter(|ip| Family::of(**ip) == family) {
                let addr = SocketAddr::new(*ip, port);
                match listen(addr) {
                    Ok(l) => tasks.push(http::serve(l, self.handler(port, family))),
                    Err(e) => errors.push(format!("{addr}: {e}")),
                }
            }
            if tasks.is_empty() {
                let e = if errors.is_empty() {
                    "no address of this family to listen on".to_owned()
                } else {
                    errors.join("; ")
                };
                if self.failed.get(&(port, family)) != Some(&e) {
                    log::error!(
                        "health check node port {port} ({}) of Service {}: cannot listen: {e}",
                        family.k8s_name(),
                        check.service
                    );
                    self.failed.insert((port, family), e);
                }
                continue;
            }
            for e in errors {
                log::warn!("health check node port {port}: {e}");
            }
            self.failed.remove(&(port, family));
            log::info!("health check node port {port} ({}): serving Service {}", family.k8s_name(), check.service);
            self.running.insert((port, family), tasks);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // The servers themselves are tested in a network namespace
    // (tests/tests/ops.rs).
    #[test]
    fn the_body_is_kube_proxys_byte_for_byte() {
        assert_eq!(
            body("ns/web", 2, true),
            "{\n\t\"service\": {\n\t\t\"namespace\": \"ns\",\n\t\t\"name\": \"web\"\n\t},\n\t\"localEndpoints\": 2,\n\t\"serviceProxyHealthy\": true\n}"
        );
        let check = |n, by_family| HealthCheck { service: "ns/web".into(), local_endpoints: n, by_family };
        let r = response(&check(0, vec![]), Family::V4, true);
        assert_eq!(r.status, 503);
        assert_eq!(r.headers, vec![("X-Load-Balancing-Endpoint-Weight", "0".to_owned())]);
        assert_eq!(response(&check(3, vec![]), Family::V6, true).status, 200);
        let sick = response(&check(3, vec![]), Family::V4, false);
        assert_eq!(sick.status, 503, "an unhealthy proxy fails every service");
        // Each family's server counts its own family's endpoints.
        let dual = check(2, vec![(Family::V4, 2), (Family::V6, 0)]);
        assert_eq!(response(&dual, Family::V4, true).status, 200);
        let v6 = response(&dual, Family::V6, true);
        assert_eq!((v6.status, v6.body.contains("\"localEndpoints\": 0")), (503, true));
        assert_eq!(families(&check(1, vec![(Family::V6, 1)])), vec![Family::V6], "single-stack: one server");
    }
}
