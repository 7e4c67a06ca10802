//! Stub library so that `proxy-userspace` can name this crate as a
//! build-dependency: cargo then rebuilds the agent whenever the datapath's
//! sources change. The programs themselves are the `dsproxy-tc` binary.
#![no_std]
