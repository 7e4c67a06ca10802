//! `cargo xtask demo`: a dual-stack Service end to end, in namespaces made
//! and removed here. Prints a transcript: which VIP, which backend answered,
//! over which family.
use std::{net::SocketAddr, path::PathBuf, process::Command};

use dsproxy_tests::{
    Cluster,
    echo::{tcp_request, udp_request},
    manifests::{Port, READY, documents, service, slice},
    topo::{vip4, vip6},
};

fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let agent = match (args.next().as_deref(), args.next()) {
        (Some("--agent"), Some(p)) => PathBuf::from(p),
        _ => anyhow::bail!("usage: dsproxy-demo --agent PATH-TO-DSPROXY"),
    };
    let mut c = Cluster::new(&agent);
    let client = c.client();
    let backends = [c.backend("be0", 8080, false), c.backend("be1", 8080, false), c.backend("be2", 8080, true)];
    let (v4, v6) = (vip4(10), vip6(10));
    let ports = [
        Port { name: "http", port: 80, proto: "TCP", target: 8080 },
        Port { name: "dns", port: 53, proto: "UDP", target: 8080 },
    ];
    let slice_ports = [("http", 8080, "TCP"), ("dns", 8080, "UDP")];
    let eps = |v6: bool| -> Vec<_> { backends.iter().map(|b| (c.addr(*b, v6), READY)).collect() };
    let text = documents(&[
        service("web", &[v4.into(), v6.into()], "RequireDualStack", &ports),
        slice("web-ipv4", "web", "IPv4", &slice_ports, &eps(false)),
        slice("web-ipv6", "web", "IPv6", &slice_ports, &eps(true)),
    ]);
    c.write("web.yaml", &text);

    println!("== dsproxy demo ==");
    println!("node namespace   {} (agent: ip netns exec {0} {} run ...)", c.topo.node.name, agent.display());
    println!("client pod       {} / {}", c.addr(client, false), c.addr(client, true));
    for (i, b) in backends.iter().enumerate() {
        let place = if i == 2 { "behind a second node" } else { "on this node" };
        println!("backend be{i}      {} / {}  ({place})", c.addr(*b, false), c.addr(*b, true));
    }
    println!("Service default/web: clusterIPs [{v4}, {v6}], ports 80/TCP (http) and 53/UDP (dns) -> 8080");
    c.start_agent();
    println!();
    println!("-- programmed (dsproxy status) --");
    let status = Command::new(&agent).arg("status").arg("--pin-dir").arg(c.bpf.pin_dir()).output()?;
    for line in String::from_utf8_lossy(&status.stdout).lines().filter(|l| l.contains("->")) {
        println!("{line}");
    }
    println!();
    println!("-- transcript --");
    for (vip, port, udp) in
        [(v4.into(), 80, false), (v6.into(), 80, false), (v4.into(), 53, true), (v6.into(), 53, true)]
    {
        let target = SocketAddr::new(vip, port);
        let replies = c.in_pod(client, move || {
            (0..4).map(|_| if udp { udp_request(target) } else { tcp_request(target) }).collect::<Vec<_>>()
        });
        for r in replies {
            let r = r.map_err(|e| anyhow::anyhow!("request to {target} failed: {e}"))?;
            let family = if r.local.is_ipv6() { "IPv6" } else { "IPv4" };
            println!(
                "{} {:<22} -> {} at {:<22} over {family}; backend saw client {}",
                if udp { "UDP" } else { "TCP" },
                target.to_string(),
                r.backend,
                r.local.to_string(),
                r.peer
            );
        }
    }
    println!();
    println!("-- datapath counters --");
    let status = Command::new(&agent).arg("status").arg("--pin-dir").arg(c.bpf.pin_dir()).output()?;
    for line in String::from_utf8_lossy(&status.stdout).lines().filter(|l| !l.contains("->")) {
        println!("{line}");
    }
    drop(c);
    println!();
    println!("torn down: agent stopped, pins removed, namespaces deleted");
    Ok(())
}
