//! Packet tests: crafted frames through the real TC program with
//! BPF_PROG_TEST_RUN, checksums re-verified in userspace. One fixture table
//! per family (Katran's PacketAttributes, Cilium's PKTGEN/CHECK).
//!
//! Needs root and BPF; fails loudly without them.
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use dsproxy::{
    sync,
    types::{Backend, Desired, Family, Frontend, FrontendSpec, Proto},
};
use dsproxy_tests::packet::Env;
use proxy_common::{Stat, ct_state, ct_timeout, programs};

const TC_ACT_OK: i32 = 0;

use dsproxy::frames::*;

// ---------------------------------------------------------------- setup

fn env() -> Env {
    Env::new()
}

fn v4(s: &str) -> IpAddr {
    s.parse().expect("addr")
}

const CLIENT4: &str = "198.18.1.2";
const CLIENT6: &str = "fd00:0:0:1::2";
const VIP4: &str = "198.19.0.10";
const VIP6: &str = "fd00:ffff::10";

fn backends(addrs: &[&str], proto: Proto) -> Vec<Backend> {
    addrs.iter().map(|a| Backend { addr: v4(a), port: 8080, proto }).collect()
}

/// Frontends for port 80 TCP and UDP on both VIPs, two backends each.
fn web(env: &mut Env) {
    let mut fronts = Vec::new();
    for proto in [Proto::Tcp, Proto::Udp] {
        fronts.push((Frontend::new(v4(VIP4), 80, proto), backends(&["198.18.2.2", "198.18.3.2"], proto)));
        fronts.push((Frontend::new(v4(VIP6), 80, proto), backends(&["fd00:0:0:2::2", "fd00:0:0:3::2"], proto)));
    }
    env.program(&fronts);
}

// ---------------------------------------------------------------- tests

/// One fixture: a frame in, the verdict and what must come out (Katran's
/// `PacketAttributes`, Cilium's PKTGEN/CHECK).
struct Case {
    description: &'static str,
    input: Vec<u8>,
    expected_verdict: i32,
    /// `None`: the frame must come out byte for byte unchanged.
    expected_dst: Option<&'static [&'static str]>,
}

fn run_cases(env: &mut Env, cases: Vec<Case>) {
    for case in cases {
        let out = env.run(&case.input);
        assert_eq!(out.verdict, case.expected_verdict, "{}: verdict", case.description);
        match case.expected_dst {
            None => assert_eq!(out.frame, case.input, "{}: frame must pass untouched", case.description),
            Some(allowed) => {
                let before = inspect(&case.input);
                let after = inspect(&out.frame);
                assert_eq!(after.src, before.src, "{}: source must not change", case.description);
                assert!(
                    allowed.iter().any(|a| v4(a) == after.dst.0) && after.dst.1 == 8080,
                    "{}: DNAT to {:?}, expected one of {allowed:?}:8080",
                    case.description,
                    after.dst
                );
                assert_eq!(out.frame.len(), case.input.len(), "{}: length", case.description);
            }
        }
    }
}

#[test]
fn should_dnat_v4_tcp_and_udp_to_v4_backends_with_valid_checksums() {
    let mut env = env();
    web(&mut env);
    let be: &[&str] = &["198.18.2.2", "198.18.3.2"];
    let (c, vip) = ((v4(CLIENT4), 40000), (v4(VIP4), 80));
    let seg = l4(c.0, vip.0, UDP, 40002, 80, 0, true);
    let IpAddr::V4(c4) = c.0 else { unreachable!() };
    let IpAddr::V4(vip4) = vip.0 else { unreachable!() };
    run_cases(
        &mut env,
        vec![
            Case {
                description: "v4 TCP SYN",
                input: frame(c, vip, TCP, SYN),
                expected_verdict: TC_ACT_OK,
                expected_dst: Some(be),
            },
            Case {
                description: "v4 UDP",
                input: frame((c.0, 40001), vip, UDP, 0),
                expected_verdict: TC_ACT_OK,
                expected_dst: Some(be),
            },
            Case {
                description: "v4 UDP without checksum",
                input: ipv4(c4, vip4, UDP, 0, &seg),
                expected_verdict: TC_ACT_OK,
                expected_dst: Some(be),
            },
            Case {
                description: "v4 TCP with IP options (IHL 7)",
                input: ipv4(c4, vip4, TCP, 8, &l4(c.0, vip.0, TCP, 40003, 80, SYN, false)),
                expected_verdict: TC_ACT_OK,
                expected_dst: Some(be),
            },
        ],
    );
    // The checksum-less UDP datagram keeps checksum 0.
    let out = env.run(&ipv4(c4, vip4, UDP, 0, &seg));
    assert_eq!(&out.frame[14 + 20 + 6..14 + 20 + 8], &[0, 0], "UDP checksum 0 must stay 0 on IPv4");
}

/// A TCP SYN from `c` port 40002 to `vip` port 80 behind an IPv6
/// hop-by-hop options header (one PadN option).
fn hop_by_hop_syn(c: IpAddr, vip: IpAddr) -> Vec<u8> {
    let (IpAddr::V6(c6), IpAddr::V6(v6)) = (c, vip) else { panic!("IPv6 only") };
    let mut payload = vec![TCP, 0, 1, 4, 0, 0, 0, 0];
    payload.extend(l4(c, vip, TCP, 40002, 80, SYN, false));
    ipv6(c6, v6, 0, &payload)
}

#[test]
fn should_dnat_v6_tcp_and_udp_to_v6_backends_with_valid_checksums() {
    let mut env = env();
    web(&mut env);
    let be: &[&str] = &["fd00:0:0:2::2", "fd00:0:0:3::2"];
    let (c, vip) = ((v4(CLIENT6), 40000), (v4(VIP6), 80));
    run_cases(
        &mut env,
        vec![
            Case {
                description: "v6 TCP SYN",
                input: frame(c, vip, TCP, SYN),
                expected_verdict: TC_ACT_OK,
                expected_dst: Some(be),
            },
            Case {
                description: "v6 TCP SYN after a hop-by-hop options header",
                input: hop_by_hop_syn(c.0, vip.0),
                expected_verdict: TC_ACT_OK,
                expected_dst: Some(be),
            },
            Case {
                description: "v6 UDP",
                input: frame((c.0, 40001), vip, UDP, 0),
                expected_verdict: TC_ACT_OK,
                expected_dst: Some(be),
            },
        ],
    );
}

#[test]
fn should_reverse_nat_replies_on_both_families() {
    let mut env = env();
    web(&mut env);
    for (client, vip) in [(CLIENT4, VIP4), (CLIENT6, VIP6)] {
        for proto in [TCP, UDP] {
            let c = (v4(client), 41000);
            let out = env.run(&frame(c, (v4(vip), 80), proto, SYN));
            let backend = inspect(&out.frame).dst;
            // The backend answers from its own address...
            let reply = env.egress(&frame(backend, c, proto, SYN | ACK));
            let seen = inspect(&reply.frame);
            // ...and the client sees the VIP.
            assert_eq!(seen.src, (v4(vip), 80), "reply source must be rewritten to the VIP ({proto})");
            assert_eq!(seen.dst, c);
        }
    }
}

#[test]
fn should_pass_everything_else_untouched() {
    let mut env = env();
    web(&mut env);
    let (c4, vip4v) = (Ipv4Addr::new(198, 18, 1, 2), Ipv4Addr::new(198, 19, 0, 10));
    let (c6, vip6v) = (CLIENT6.parse::<Ipv6Addr>().expect("v6"), VIP6.parse::<Ipv6Addr>().expect("v6"));
    let syn4 = l4(c4.into(), vip4v.into(), TCP, 40000, 80, SYN, false);
    let syn6 = l4(c6.into(), vip6v.into(), TCP, 40000, 80, SYN, false);
    let mut arp = eth(0x0806);
    arp.extend([0, 1, 8, 0, 6, 4, 0, 1]);
    arp.extend([0u8; 20]);
    let mut fragment = ipv4(c4, vip4v, TCP, 0, &syn4);
    // A later fragment (offset 8 bytes) whose first fragment was never seen.
    fragment[14 + 6] = 0x20; // more fragments
    fragment[14 + 7] = 0x01; // offset 1 (x 8 bytes)
    let mut truncated = ipv4(c4, vip4v, TCP, 0, &syn4);
    truncated.truncate(14 + 20 + 10);
    let mut bad_ihl = ipv4(c4, vip4v, TCP, 0, &syn4);
    bad_ihl[14] = 0x44;
    let mut bad_version = ipv4(c4, vip4v, TCP, 0, &syn4);
    bad_version[14] = 0x55;
    let mut long_tot_len = ipv4(c4, vip4v, TCP, 0, &syn4);
    long_tot_len[16..18].copy_from_slice(&1500u16.to_be_bytes());
    let mut bad_doff = ipv4(c4, vip4v, TCP, 0, &syn4);
    bad_doff[14 + 20 + 12] = 0x40;
    let mut v6_truncated = ipv6(c6, vip6v, TCP, &syn6);
    v6_truncated.truncate(14 + 40 + 8);
    let mut v6_zero_udp = ipv6(c6, vip6v, UDP, &l4(c6.into(), vip6v.into(), UDP, 40000, 80, 0, false));
    v6_zero_udp[14 + 40 + 6..14 + 40 + 8].copy_from_slice(&[0, 0]);
    let icmp4 = ipv4(c4, vip4v, 1, 0, &[8, 0, 0xf7, 0xff, 0, 0, 0, 0]);
    let icmp6_ns = ipv6(c6, "ff02::1:ff00:1".parse().expect("v6"), 58, &[135, 0, 0, 0, 0, 0, 0, 0]);
    let cases = vec![
        Case { description: "ARP", input: arp, expected_verdict: TC_ACT_OK, expected_dst: None },
        Case { description: "ICMP echo to the VIP", input: icmp4, expected_verdict: TC_ACT_OK, expected_dst: None },
        Case {
            description: "ICMPv6 neighbour solicitation",
            input: icmp6_ns,
            expected_verdict: TC_ACT_OK,
            expected_dst: None,
        },
        Case {
            description: "TCP to a non-service address",
            input: frame((v4(CLIENT4), 1), (v4("198.18.9.9"), 80), TCP, SYN),
            expected_verdict: TC_ACT_OK,
            expected_dst: None,
        },
        Case {
            description: "TCP to the VIP on another port",
            input: frame((v4(CLIENT4), 1), (v4(VIP4), 81), TCP, SYN),
            expected_verdict: TC_ACT_OK,
            expected_dst: None,
        },
        Case {
            description: "v6 TCP to a non-service address",
            input: frame((v4(CLIENT6), 1), (v4("fd00::9"), 80), TCP, SYN),
            expected_verdict: TC_ACT_OK,
            expected_dst: None,
        },
        Case {
            description: "IPv4 later fragment to the VIP, first fragment never seen",
            input: fragment,
            expected_verdict: TC_ACT_OK,
            expected_dst: None,
        },
        Case {
            description: "IPv4 truncated inside TCP",
            input: truncated,
            expected_verdict: TC_ACT_OK,
            expected_dst: None,
        },
        Case { description: "IPv4 IHL 4", input: bad_ihl, expected_verdict: TC_ACT_OK, expected_dst: None },
        Case { description: "IP version 5", input: bad_version, expected_verdict: TC_ACT_OK, expected_dst: None },
        Case {
            description: "IPv4 total length beyond the frame",
            input: long_tot_len,
            expected_verdict: TC_ACT_OK,
            expected_dst: None,
        },
        Case { description: "TCP data offset 4", input: bad_doff, expected_verdict: TC_ACT_OK, expected_dst: None },
        Case {
            description: "IPv6 truncated inside TCP",
            input: v6_truncated,
            expected_verdict: TC_ACT_OK,
            expected_dst: None,
        },
        Case {
            description: "IPv6 UDP with checksum 0",
            input: v6_zero_udp,
            expected_verdict: TC_ACT_OK,
            expected_dst: None,
        },
    ];
    run_cases(&mut env, cases);
}

#[test]
fn should_pass_random_garbage_untouched() {
    let mut env = env();
    web(&mut env);
    let mut rng = dsproxy::rand::XorShift::new(0x9e37_79b9_7f4a_7c15);
    let mut next = move || rng.next_u64();
    for i in 0..2000 {
        let len = 14 + usize::try_from(next() % 120).expect("len");
        let mut f: Vec<u8> = (0..len).map(|_| next().to_le_bytes()[0]).collect();
        let ethertype: u16 = if i % 2 == 0 { 0x0800 } else { 0x86DD };
        f[12..14].copy_from_slice(&ethertype.to_be_bytes());
        if len > 15 {
            f[14] = if ethertype == 0x0800 { 0x45 } else { 0x60 };
        }
        // BPF_PROG_TEST_RUN itself refuses a frame too short for the IP
        // header its ethertype names, before the program runs.
        let l3_min = if ethertype == 0x0800 { 14 + 20 } else { 14 + 40 };
        let out = match env.try_run(&f) {
            Ok(out) => out,
            Err(e) if len < l3_min && e.raw_os_error() == Some(libc::EINVAL) => continue,
            Err(e) => panic!("BPF_PROG_TEST_RUN on random frame {i} ({len} bytes): {e}"),
        };
        assert_eq!(out.verdict, TC_ACT_OK, "frame {i}");
        assert_eq!(out.frame, f, "random frame {i} was modified");
    }
}

const TC_ACT_REDIRECT: i32 = 7;

/// A frontend without backends of its family answers new TCP connections
/// with a RST and UDP datagrams with ICMP port unreachable, from the VIP,
/// and never translates to the other family.
#[test]
fn should_refuse_connections_to_a_vip_without_backends_of_its_family() {
    let mut env = env();
    let mut fronts = Vec::new();
    for proto in [Proto::Tcp, Proto::Udp] {
        // Only IPv4 endpoints: the IPv6 frontends are empty.
        fronts.push((Frontend::new(v4(VIP4), 80, proto), vec![]));
        fronts.push((Frontend::new(v4(VIP6), 80, proto), vec![]));
    }
    env.program(&fronts);
    for (client, vip) in [(CLIENT4, VIP4), (CLIENT6, VIP6)] {
        let (c, vip) = ((v4(client), 1234), (v4(vip), 80));
        // TCP SYN: RST|ACK acknowledging SYN + 7 payload bytes, from the VIP.
        let out = env.run(&frame(c, vip, TCP, SYN));
        assert_eq!(out.verdict, TC_ACT_REDIRECT, "{client}: the RST goes back out of the interface");
        let seen = inspect(&out.frame);
        assert_eq!((seen.src, seen.dst), (vip, c), "{client}: RST from the VIP to the client");
        let tcp = &out.frame[out.frame.len() - 20..];
        assert_eq!(tcp[13], RST | ACK, "{client}: flags");
        assert_eq!(u32::from_be_bytes(tcp[8..12].try_into().expect("4")), 1000 + 1 + 7, "{client}: ack");
        assert_eq!(&out.frame[..6], &[2, 0, 0, 0, 0, 2], "{client}: MACs swapped");
        // A FIN (no SYN) of no flow of ours: a connection another proxy
        // set up before dsproxy; left to the host stack, not refused.
        let fin = frame(c, vip, TCP, FIN | ACK);
        let out = env.run(&fin);
        assert_eq!((out.verdict, &out.frame), (TC_ACT_OK, &fin), "{client}: a FIN of no flow passes untouched");
        // A RST is never answered.
        let rst = frame(c, vip, TCP, RST);
        assert_eq!(env.run(&rst).frame, rst, "{client}: a RST passes untouched");
        // UDP: ICMP port unreachable quoting the datagram's headers.
        let dgram = frame(c, vip, UDP, 0);
        let out = env.run(&dgram);
        assert_eq!(out.verdict, TC_ACT_REDIRECT);
        check_port_unreachable(&out.frame, &dgram);
    }
    let stats = env.maps.stats().expect("stats");
    let count = |name: &str| stats.iter().filter(|(_, s, _)| s.name() == name).map(|(_, _, n)| n).sum::<u64>();
    assert_eq!(count("reject_no_backend"), 4, "a SYN and a datagram per family: {stats:?}");
    assert_eq!(count("dnat_new") + count("dnat_established"), 0, "nothing translated: {stats:?}");
}

/// `icmp` is a valid ICMP / ICMPv6 port unreachable for `orig`, sent from
/// orig's destination to orig's source.
fn check_port_unreachable(icmp: &[u8], orig: &[u8]) {
    let v6 = u16::from_be_bytes([orig[12], orig[13]]) == 0x86DD;
    let (ip_len, msg_off) = if v6 { (40, 14 + 40) } else { (20, 14 + 20) };
    let msg = &icmp[msg_off..];
    assert_eq!(msg.len(), 8 + ip_len + 8, "ICMP quotes the IP header and 8 bytes");
    assert_eq!(&msg[8..], &orig[14..14 + ip_len + 8], "quoted headers");
    let (src, dst) = if v6 {
        let s = IpAddr::V6(Ipv6Addr::from(<[u8; 16]>::try_from(&icmp[22..38]).expect("16")));
        let d = IpAddr::V6(Ipv6Addr::from(<[u8; 16]>::try_from(&icmp[38..54]).expect("16")));
        assert_eq!((msg[0], msg[1], icmp[20]), (1, 4, 58), "ICMPv6 port unreachable");
        let sum = csum_add(&pseudo(s, d, 58, msg.len())) + csum_add(msg);
        assert_eq!(csum_fold(sum), 0, "ICMPv6 checksum");
        (s, d)
    } else {
        assert_eq!(csum_fold(csum_add(&icmp[14..34])), 0, "IPv4 header checksum");
        assert_eq!((msg[0], msg[1], icmp[23]), (3, 3, 1), "ICMP port unreachable");
        assert_eq!(csum_fold(csum_add(msg)), 0, "ICMP checksum");
        let s = IpAddr::V4(Ipv4Addr::new(icmp[26], icmp[27], icmp[28], icmp[29]));
        let d = IpAddr::V4(Ipv4Addr::new(icmp[30], icmp[31], icmp[32], icmp[33]));
        (s, d)
    };
    let before = inspect(orig);
    assert_eq!((src, dst), (before.dst.0, before.src.0), "from the VIP to the client");
}

fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: valid out-pointer.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &raw mut ts) };
    u64::try_from(ts.tv_sec).expect("secs") * 1_000_000_000 + u64::try_from(ts.tv_nsec).expect("ns")
}

/// The forward entry of the v4 flow from `client` port `sport`.
fn ct4_forward(env: &Env, sport: u16) -> proxy_common::CtFwd4 {
    env.maps
        .ct4_fwd
        .iter()
        .filter_map(Result::ok)
        .find(|(k, _)| u16::from_be(k.sport) == sport)
        .map(|(_, v)| v)
        .expect("forward conntrack entry")
}

#[test]
fn should_expire_conntrack_entries_by_tcp_state() {
    let mut env = env();
    web(&mut env);
    let c = (v4(CLIENT4), 42000);
    let vip = (v4(VIP4), 80);
    let remaining = |env: &Env| ct4_forward(env, 42000).expires.saturating_sub(monotonic_ns());
    let backend = inspect(&env.run(&frame(c, vip, TCP, SYN)).frame).dst;
    assert!(remaining(&env) <= ct_timeout::TCP_SYN && remaining(&env) > ct_timeout::TCP_SYN / 2, "SYN timeout");
    env.run(&frame(backend, c, TCP, SYN | ACK));
    assert_ne!(ct4_forward(&env, 42000).state & ct_state::SEEN_REPLY, 0);
    assert!(remaining(&env) > ct_timeout::TCP_SYN, "an answered connection is established");
    env.run(&frame(c, vip, TCP, FIN | ACK));
    assert!(remaining(&env) > ct_timeout::TCP_SYN, "one FIN: still open (half-closed)");
    env.run(&frame(backend, c, TCP, FIN | ACK));
    assert!(remaining(&env) <= ct_timeout::TCP_CLOSE, "FIN both ways: close timeout");

    let c2 = (v4(CLIENT4), 42001);
    let b2 = inspect(&env.run(&frame(c2, vip, TCP, SYN)).frame).dst;
    env.run(&frame(b2, c2, TCP, RST));
    let left = ct4_forward(&env, 42001).expires.saturating_sub(monotonic_ns());
    assert!(left <= ct_timeout::TCP_CLOSE, "RST: close timeout");

    let c3 = (v4(CLIENT4), 42002);
    env.run(&frame(c3, (v4(VIP4), 80), UDP, 0));
    let udp = env
        .maps
        .ct4_fwd
        .iter()
        .filter_map(Result::ok)
        .find(|(k, _)| u16::from_be(k.sport) == 42002)
        .expect("udp entry")
        .1;
    let left = udp.expires.saturating_sub(monotonic_ns());
    assert!(left <= ct_timeout::UDP && left > ct_timeout::UDP / 2, "UDP idle timeout");
}

#[test]
fn should_keep_established_flows_on_their_backend_when_backends_change() {
    let mut env = env();
    let f = Frontend::new(v4(VIP4), 80, Proto::Tcp);
    env.program(&[(f, backends(&["198.18.2.2"], Proto::Tcp))]);
    let c = (v4(CLIENT4), 43000);
    let vip = (v4(VIP4), 80);
    let first = inspect(&env.run(&frame(c, vip, TCP, SYN)).frame).dst;
    assert_eq!(first.0, v4("198.18.2.2"));
    env.run(&frame(first, c, TCP, SYN | ACK));
    // The backend set is replaced entirely.
    env.program(&[(f, backends(&["198.18.3.2", "198.18.4.2"], Proto::Tcp))]);
    for _ in 0..5 {
        let again = inspect(&env.run(&frame(c, vip, TCP, ACK)).frame).dst;
        assert_eq!(again, first, "an established flow must keep its backend");
    }
    for port in 0..20 {
        let new = inspect(&env.run(&frame((c.0, 44000 + port), vip, TCP, SYN)).frame).dst;
        assert_ne!(new.0, v4("198.18.2.2"), "new flows must not go to a removed backend");
    }
}

#[test]
fn should_move_udp_flows_off_a_removed_backend_and_keep_them_otherwise() {
    let mut env = env();
    let f = Frontend::new(v4(VIP6), 80, Proto::Udp);
    env.program(&[(f, backends(&["fd00:0:0:2::2"], Proto::Udp))]);
    let c = (v4(CLIENT6), 45000);
    let vip = (v4(VIP6), 80);
    let first = inspect(&env.run(&frame(c, vip, UDP, 0)).frame).dst;
    assert_eq!(first.0, v4("fd00:0:0:2::2"));
    // Another backend joins: the flow stays where it is.
    env.program(&[(f, backends(&["fd00:0:0:2::2", "fd00:0:0:3::2"], Proto::Udp))]);
    for _ in 0..5 {
        assert_eq!(inspect(&env.run(&frame(c, vip, UDP, 0)).frame).dst, first, "a live UDP flow keeps its backend");
    }
    // Its backend leaves: the next datagram reaches the live one.
    env.program(&[(f, backends(&["fd00:0:0:3::2"], Proto::Udp))]);
    let moved = inspect(&env.run(&frame(c, vip, UDP, 0)).frame).dst;
    assert_eq!(moved.0, v4("fd00:0:0:3::2"), "a UDP flow must leave a removed backend");
    // And the reply of the new backend is reverse-translated.
    let reply = inspect(&env.egress(&frame(moved, c, UDP, 0)).frame);
    assert_eq!(reply.src, vip);
}

/// Every per-frontend setting written to the real maps comes back at
/// read-back (what a restarted agent diffs against): a change of only the
/// affinity timeout is one write, and an unchanged state none.
#[test]
fn should_read_back_frontend_settings_and_scopes_from_the_maps() {
    use dsproxy::types::{Kind, Scope, Settings, WhenEmpty};
    let mut env = env();
    let ext = Frontend::new(v4(VIP6), 80, Proto::Tcp);
    let int = ext.with_scope(Scope::Internal);
    let mut desired = Desired::default();
    let mut spec = FrontendSpec::new("default/web:http", backends(&["fd00:0:0:2::2"], Proto::Tcp));
    spec.settings = Settings {
        kind: Kind::LoadBalancer,
        affinity_timeout: Some(10_800),
        when_empty: WhenEmpty::Drop,
        source_ranges: vec!["2001:db8::/32".parse().expect("cidr"), "fd00:0:0:1::/64".parse().expect("cidr")],
        two_scopes: true,
        external_local: true,
    };
    desired.frontends.insert(ext, spec.clone());
    desired.frontends.insert(int, FrontendSpec::new("default/web:http", backends(&["fd00:0:0:3::2"], Proto::Tcp)));
    desired.nodeport_addresses = vec![v4("198.18.251.2"), v4("fd00:0:0:fb::2")];
    let report = sync::sync(&mut env.maps, &mut env.prog, &desired);
    assert!(report.errors.is_empty(), "{:?}", report.errors);
    let back = env.maps.read_back().expect("read back");
    assert_eq!(back.frontends[&ext].settings, spec.settings, "slot 0 and the source-range trie");
    assert_eq!(back.active_backends(&int), Some(desired.frontends[&int].backends.clone()), "the internal scope");
    assert_eq!(back.node_addresses, desired.nodeport_addresses.iter().copied().collect());
    let id = back.frontends[&ext].rev_nat_id;
    let members: Vec<Backend> = back.v6.affinity[&id].iter().map(|b| *back.v6.backend(*b).expect("written")).collect();
    assert_eq!(members, spec.backends, "the affinity memberships of the external scope");
    assert!(!back.v6.affinity.contains_key(&back.frontends[&int].rev_nat_id), "none without affinity");
    let mut fresh = back;
    assert_eq!(sync::sync(&mut env.maps, &mut fresh, &desired).ops, 0, "nothing to write after a read-back");
    desired.frontends.get_mut(&ext).expect("ext").settings.affinity_timeout = Some(30);
    assert_eq!(sync::sync(&mut env.maps, &mut fresh, &desired).ops, 1, "only slot 0 is rewritten");
    assert_eq!(env.maps.read_back().expect("read back").frontends[&ext].settings.affinity_timeout, Some(30));
}

/// One ICMP translation fixture: an error about a flow of `web`, the hook
/// it passes, and the frame that must come out, byte for byte.
struct IcmpCase {
    description: String,
    input: Vec<u8>,
    egress: bool,
    expected: Vec<u8>,
}

/// The ICMP errors of both families about a flow from `client` to `vip`
/// (TCP and UDP), as a router on the way, the backend's host, or the
/// client sends them, with what the client (or backend) must receive.
/// Every flow here goes through the host stack (BPF_PROG_TEST_RUN runs
/// where no interface is ours), so errors towards the client are
/// translated at egress and errors towards the backend at ingress.
fn icmp_cases(env: &mut Env, client: &str, vip: &str, router: &str) -> Vec<IcmpCase> {
    let v6 = v4(client).is_ipv6();
    // (type, code, extra, what) per error: fragmentation needed / packet
    // too big, port unreachable, time exceeded.
    let (too_big, unreach, ttl) = if v6 { ((2, 0), (1, 4), (3, 0)) } else { ((3, 4), (3, 3), (11, 0)) };
    let mut cases = Vec::new();
    for (proto, sport) in [(TCP, 43000), (UDP, 43001)] {
        let c = (v4(client), sport);
        let front = (v4(vip), 80);
        let opening = frame(c, front, proto, SYN);
        let backend = inspect(&env.run(&opening).frame).dst;
        // The packet as the backend's side sees it, and its reply.
        let to_backend = frame(c, backend, proto, SYN);
        let reply = frame(backend, c, proto, SYN | ACK);
        let reply_seen = frame(front, c, proto, SYN | ACK);
        let r = v4(router);
        for (what, from, kind, extra, quote) in [
            ("fragmentation needed / packet too big from a router", r, too_big, 1280, None),
            ("time exceeded from a router, 8 bytes quoted", r, ttl, 0, Some(8)),
            ("port unreachable from the backend", backend.0, unreach, 0, None),
        ] {
            // The outer source becomes the frontend when it was the backend.
            let seen_from = if from == backend.0 { front.0 } else { from };
            cases.push(IcmpCase {
                description: format!("{what} ({proto}, {client}) at egress towards the client"),
                input: icmp_error(from, c.0, kind, extra, &to_backend, quote),
                egress: true,
                expected: icmp_error(seen_from, c.0, kind, extra, &opening, quote),
            });
            // At ingress the host stack must see it as sent: it forwards
            // the flow, and egress translates.
            let input = icmp_error(from, c.0, kind, extra, &to_backend, quote);
            cases.push(IcmpCase {
                description: format!("{what} ({proto}, {client}) at ingress"),
                expected: input.clone(),
                input,
                egress: false,
            });
        }
        // The client's side refuses a reply: the error about the frontend's
        // packet goes to the backend, about the backend's packet.
        cases.push(IcmpCase {
            description: format!("port unreachable from the client ({proto}, {client}) at ingress"),
            input: icmp_error(c.0, front.0, unreach, 0, &reply_seen, None),
            egress: false,
            expected: icmp_error(c.0, backend.0, unreach, 0, &reply, None),
        });
        // About no flow of ours: untouched, both hooks.
        let other = frame(c, (v4(router), 9), proto, SYN);
        for egress in [false, true] {
            let input = icmp_error(v4(router), c.0, unreach, 0, &other, None);
            cases.push(IcmpCase {
                description: format!("an error about another flow ({proto}, {client}, egress={egress})"),
                expected: input.clone(),
                input,
                egress,
            });
        }
    }
    cases
}

/// ICMP errors about service flows are translated inside and out, with
/// every checksum right (the expected frames are built from scratch), so
/// path MTU discovery and ECONNREFUSED work through a VIP: IPv4
/// fragmentation needed, port unreachable, time exceeded; ICMPv6 packet
/// too big, port unreachable, time exceeded.
#[test]
fn should_translate_icmp_errors_about_service_flows() {
    let mut env = env();
    web(&mut env);
    let mut translated = 0;
    for (client, vip, router) in [(CLIENT4, VIP4, "198.18.250.2"), (CLIENT6, VIP6, "fd00:0:0:fa::2")] {
        for case in icmp_cases(&mut env, client, vip, router) {
            let out = if case.egress { env.egress(&case.input) } else { env.run(&case.input) };
            assert_eq!(out.verdict, TC_ACT_OK, "{}: verdict", case.description);
            assert_eq!(out.frame, case.expected, "{}: output frame", case.description);
            translated += usize::from(case.expected != case.input);
        }
    }
    let stats = env.maps.stats().expect("stats");
    let xlated: u64 = stats.iter().filter(|(_, s, _)| s.name() == "icmp_xlate").map(|(_, _, n)| n).sum();
    assert_eq!(xlated, u64::try_from(translated).expect("count"), "every translation counted: {stats:?}");
}

/// An ICMP error whose quote ends before the quoted TCP checksum, in a
/// frame with Ethernet padding after the IP packet: the padding is not
/// part of the error, so it must not be read as the quoted checksum nor
/// rewritten, and the ICMP checksum must stay right (found by the fuzzer:
/// the padding was rewritten and counted into the ICMP checksum).
#[test]
fn should_leave_padding_after_an_icmp_error_alone_when_translating_it() {
    let mut env = env();
    web(&mut env);
    for (client, vip) in [(CLIENT4, VIP4), (CLIENT6, VIP6)] {
        let (c, front) = ((v4(client), 44000), (v4(vip), 80));
        let backend = inspect(&env.run(&frame(c, front, TCP, SYN)).frame).dst;
        // The client's side refuses the reply it saw (from the frontend),
        // quoting 14 bytes of TCP: the checksum (at 16) is not quoted.
        let unreach = if c.0.is_ipv6() { (1, 4) } else { (3, 3) };
        let reply_seen = frame(front, c, TCP, SYN | ACK);
        let reply = frame(backend, c, TCP, SYN | ACK);
        let padding = [0xee; 10];
        let mut input = icmp_error(c.0, front.0, unreach, 0, &reply_seen, Some(14));
        input.extend(padding);
        let mut expected = icmp_error(c.0, backend.0, unreach, 0, &reply, Some(14));
        expected.extend(padding);
        let out = env.run(&input);
        assert_eq!(out.verdict, TC_ACT_OK);
        assert_eq!(out.frame, expected, "{client}: the error translated, the padding untouched");
    }
}

/// The quick slice of `cargo xtask fuzz`: 20,000 generated and mutated
/// frames of both families through the three programs, each checked
/// against the reference model (`dsproxy_tests::fuzz`) for its verdict and
/// every byte that comes out. A failure prints the frame and the command
/// that replays it.
#[test]
fn should_agree_with_the_reference_model_on_20000_fuzzed_frames() {
    use dsproxy_tests::fuzz::{self, Options, model::Outcome};
    let opts = Options { seed: 0x005e_edd5_9a05, frames: 20_000, epoch_frames: 20_000, only_epoch: None };
    println!("fuzz: seed {:#x}", opts.seed);
    let report = fuzz::run(&opts, |_| {}).unwrap_or_else(|failure| panic!("{failure}"));
    println!("{report}");
    assert_eq!(report.frames, 20_000);
    for outcome in [
        Outcome::Untouched,
        Outcome::NewFlow,
        Outcome::Established,
        Outcome::Reply,
        Outcome::IcmpError,
        Outcome::Refused,
        Outcome::Dropped,
        Outcome::NoRoute,
    ] {
        assert!(report.count(outcome) >= 100, "too few frames {}: {report}", outcome.name());
    }
}

/// Per-packet rules of the Service API on crafted frames, both families:
/// node ports answer only on the node addresses listed; a Local-policy
/// frontend with no local endpoint drops external clients while pods use
/// the internal scope (the cluster-wide endpoints); source ranges admit
/// and drop by client; an external client of a Cluster-policy frontend
/// whose backend no interface of ours leads to is dropped (its replies
/// would reach the node, not us), never sent on half translated.
#[test]
fn should_apply_node_addresses_scopes_source_ranges_and_masquerade_rules_per_packet() {
    use dsproxy::types::{Kind, Scope, Settings, WhenEmpty};
    const TC_ACT_SHOT: i32 = 2;
    let mut env = env();
    let mut desired = Desired::default();
    let fams = [
        ("198.18.251.2", "198.18.251.1", "198.18.1.2", "198.18.5.2", "198.18.3.2", "198.19.2.10", "198.18.1.0/24"),
        (
            "fd00:0:0:fb::2",
            "fd00:0:0:fb::1",
            "fd00:0:0:1::2",
            "fd00:0:0:5::2",
            "fd00:0:0:3::2",
            "fd00:ffff::2:10",
            "fd00:0:0:1::/64",
        ),
    ];
    for (node, _, _, _, remote, lb, range) in fams {
        // A node port with externalTrafficPolicy Local and no endpoint
        // here: its external entry drops, its internal one has the cluster.
        let np = Frontend::new(Family::of(v4(node)).unspecified(), 30_080, Proto::Tcp);
        let mut ext = FrontendSpec::new("default/np:tcp", vec![]);
        ext.settings = Settings {
            kind: Kind::NodePort,
            when_empty: WhenEmpty::Drop,
            two_scopes: true,
            external_local: true,
            ..Settings::default()
        };
        desired.frontends.insert(np, ext);
        let mut int = FrontendSpec::new("default/np:tcp", backends(&[remote], Proto::Tcp));
        int.settings.kind = Kind::NodePort;
        desired.frontends.insert(np.with_scope(Scope::Internal), int);
        // A load-balancer IP with externalTrafficPolicy Cluster and a range.
        let mut lb_spec = FrontendSpec::new("default/lb:tcp", backends(&[remote], Proto::Tcp));
        lb_spec.settings = Settings {
            kind: Kind::LoadBalancer,
            source_ranges: vec![range.parse().expect("cidr")],
            ..Settings::default()
        };
        desired.frontends.insert(Frontend::new(v4(lb), 80, Proto::Tcp), lb_spec);
        desired.nodeport_addresses.push(v4(node));
    }
    let report = sync::sync(&mut env.maps, &mut env.prog, &desired);
    assert!(report.errors.is_empty(), "{:?}", report.errors);
    let stat = |env: &Env, s: Stat| env.maps.stat(s).expect("counters");
    for (node, outside, pod, stranger, remote, lb, _) in fams {
        let syn = |from: &str, to: &str, port: u16| frame((v4(from), 40_000), (v4(to), port), TCP, SYN);
        // Node port, from a pod: the internal scope, the cluster's endpoint.
        let out = env.run(&syn(pod, node, 30_080));
        assert_eq!(inspect(&out.frame).dst, (v4(remote), 8080), "{node}: a pod is sent to the cluster");
        // ... not on an address that is not listed.
        let other = if v4(node).is_ipv4() { "198.18.9.9" } else { "fd00:0:0:9::9" };
        let f = syn(pod, other, 30_080);
        assert_eq!(env.run(&f).frame, f, "{other}: not a node address, untouched");
        // From outside: no local endpoint, dropped (not refused).
        let before = stat(&env, Stat::DropNoLocalBackend);
        let out = env.try_run_prog(programs::FROM_DEVICE, &syn(outside, node, 30_080)).expect("run");
        assert_eq!(out.verdict, TC_ACT_SHOT, "{node}: external client, no local endpoint");
        assert_eq!(stat(&env, Stat::DropNoLocalBackend), before + 1);
        // Source ranges: a pod inside is admitted, one outside dropped.
        let out = env.run(&syn(pod, lb, 80));
        assert_eq!(inspect(&out.frame).dst, (v4(remote), 8080), "{lb}: admitted from {pod}");
        let before = stat(&env, Stat::DropSourceRange);
        assert_eq!(env.run(&syn(stranger, lb, 80)).verdict, TC_ACT_SHOT, "{lb}: {stranger} is outside the range");
        assert_eq!(stat(&env, Stat::DropSourceRange), before + 1);
        // An external client (in range) of a Cluster-policy frontend: the
        // masquerade needs a route out of one of our interfaces, and
        // BPF_PROG_TEST_RUN runs where none is ours.
        let before = stat(&env, Stat::MasqueradeNoRoute);
        let fresh = frame((v4(pod), 40_001), (v4(lb), 80), TCP, SYN);
        let out = env.try_run_prog(programs::FROM_DEVICE, &fresh).expect("run");
        assert_eq!(out.verdict, TC_ACT_SHOT, "{lb}: no masquerade without a route of ours");
        assert_eq!(stat(&env, Stat::MasqueradeNoRoute), before + 1);
    }
}

/// The frontend-address filter holds every frontend's address and every
/// node address NodePorts answer on, and loses an address once nothing
/// uses it. A live TCP flow skips the frontend lookup only while its
/// frontend exists: once the frontend is gone, its packets pass untouched
/// (as they did when every packet met the frontend lookup first).
#[test]
fn should_keep_the_frontend_filter_to_the_programmed_addresses_and_leave_a_removed_frontends_flows() {
    let mut env = env();
    let bit = |env: &Env, a: &str| {
        let (i, b) = dsproxy::filter::slot(&v4(a));
        env.maps.filter4.get(&u32::try_from(i).expect("index"), 0).expect("filter word") & b != 0
    };
    let (other_vip, node) = ("198.19.0.11", "198.18.0.1");
    let web = Frontend::new(v4(VIP4), 80, Proto::Tcp);
    let other = Frontend::new(v4(other_vip), 80, Proto::Tcp);
    let mut desired = Desired::default();
    desired.frontends.insert(web, FrontendSpec::new("default/web:p", backends(&["198.18.2.2"], Proto::Tcp)));
    desired.frontends.insert(other, FrontendSpec::new("default/other:p", backends(&["198.18.3.2"], Proto::Tcp)));
    desired.nodeport_addresses = vec![v4(node)];
    env.program_desired(&desired);
    assert!(bit(&env, VIP4) && bit(&env, other_vip) && bit(&env, node), "every frontend and node address");

    let (c, vip) = ((v4(CLIENT4), 46000), (v4(VIP4), 80));
    let backend = inspect(&env.run(&frame(c, vip, TCP, SYN)).frame).dst;
    env.run(&frame(backend, c, TCP, SYN | ACK));
    assert_eq!(inspect(&env.run(&frame(c, vip, TCP, ACK)).frame).dst, backend, "established");

    // `web` and the node address go.
    desired.frontends.remove(&web);
    desired.nodeport_addresses.clear();
    env.program_desired(&desired);
    let shares = |a: &str| dsproxy::filter::slot(&v4(a)) == dsproxy::filter::slot(&v4(other_vip));
    assert_eq!(bit(&env, VIP4), shares(VIP4), "a removed frontend's address leaves the filter");
    assert_eq!(bit(&env, node), shares(node), "a removed node address leaves the filter");
    assert!(bit(&env, other_vip), "a remaining frontend keeps its bit");
    let out = env.run(&frame(c, vip, TCP, ACK));
    assert_eq!(
        (out.verdict, inspect(&out.frame).dst),
        (TC_ACT_OK, vip),
        "the removed frontend's flow passes untouched"
    );
    let to_other = inspect(&env.run(&frame((c.0, 46001), (v4(other_vip), 80), TCP, SYN)).frame).dst;
    assert_eq!(to_other.0, v4("198.18.3.2"), "the other frontend still translates");
}
