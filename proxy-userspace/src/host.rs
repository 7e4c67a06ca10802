//! This host's interface addresses (`getifaddrs`), which no Service may
//! claim (the model's address policy).
use std::{
    ffi::c_int,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("reading interface addresses (getifaddrs): {0}")]
    GetIfAddrs(std::io::Error),
}

/// Every address of every interface, and the IPv4 subnet broadcast
/// addresses; sorted, without duplicates.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct InterfaceAddresses {
    pub addresses: Vec<IpAddr>,
    pub broadcasts: Vec<IpAddr>,
}

/// The address in a `sockaddr`, if it is IPv4 or IPv6.
///
/// # Safety
/// `sa` is null or points to a `sockaddr` whose `sa_family` tells its real
/// type, as `getifaddrs` hands them out.
unsafe fn sockaddr_ip(sa: *const libc::sockaddr) -> Option<IpAddr> {
    if sa.is_null() {
        return None;
    }
    // SAFETY: non-null and valid per the caller; the family field is
    // common to every sockaddr type.
    let family = c_int::from(unsafe { (*sa).sa_family });
    match family {
        libc::AF_INET => {
            // SAFETY: AF_INET means the storage is a sockaddr_in; read
            // unaligned, as a sockaddr only promises 2-byte alignment.
            let sin = unsafe { sa.cast::<libc::sockaddr_in>().read_unaligned() };
            Some(IpAddr::V4(Ipv4Addr::from(u32::from_be(sin.sin_addr.s_addr))))
        }
        libc::AF_INET6 => {
            // SAFETY: AF_INET6 means the storage is a sockaddr_in6; read
            // unaligned, as above.
            let sin6 = unsafe { sa.cast::<libc::sockaddr_in6>().read_unaligned() };
            Some(IpAddr::V6(Ipv6Addr::from(sin6.sin6_addr.s6_addr)))
        }
        _ => None,
    }
}

/// Read the addresses of every interface in this network namespace.
pub fn interface_addresses() -> Result<InterfaceAddresses, Error> {
    let mut head: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: getifaddrs writes a list head into `head`; freed below.
    if unsafe { libc::getifaddrs(&raw mut head) } != 0 {
        return Err(Error::GetIfAddrs(std::io::Error::last_os_error()));
    }
    let mut out = InterfaceAddresses::default();
    let mut cur = head;
    while !cur.is_null() {
        // SAFETY: `cur` is a node of the list getifaddrs returned, not yet
        // freed.
        let ifa = unsafe { &*cur };
        // SAFETY: the list's sockaddrs are valid or null.
        if let Some(addr) = unsafe { sockaddr_ip(ifa.ifa_addr) } {
            out.addresses.push(addr);
            // The subnet's broadcast address, from the netmask (what the
            // kernel reports as broadcast address is whatever `ip addr`
            // was given, often nothing).
            // SAFETY: as above.
            if let (IpAddr::V4(a), Some(IpAddr::V4(mask))) = (addr, unsafe { sockaddr_ip(ifa.ifa_netmask) })
                && mask.to_bits().count_ones() < 31
            {
                out.broadcasts.push(IpAddr::V4(Ipv4Addr::from_bits(a.to_bits() | !mask.to_bits())));
            }
        }
        cur = ifa.ifa_next;
    }
    // SAFETY: `head` came from getifaddrs and is freed once.
    unsafe { libc::freeifaddrs(head) };
    for list in [&mut out.addresses, &mut out.broadcasts] {
        list.sort_unstable();
        list.dedup();
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loopback_is_among_the_interface_addresses_and_its_broadcast_is_computed() {
        let a = interface_addresses().expect("getifaddrs");
        assert!(a.addresses.contains(&IpAddr::V4(Ipv4Addr::LOCALHOST)), "{a:?}");
        assert!(a.broadcasts.contains(&IpAddr::V4(Ipv4Addr::new(127, 255, 255, 255))), "{a:?}");
    }
}
