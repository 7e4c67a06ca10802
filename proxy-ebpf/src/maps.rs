//! The datapath's maps. Names match `proxy_common::names` and are pinned by
//! name under the agent's pin directory; capacities here are defaults that
//! the agent overrides at load time.
use aya_ebpf::{
    macros::map,
    maps::{Array, HashMap, LruHashMap, PerCpuArray},
};
use proxy_common::{
    Backend4, Backend6, Ct4Key, Ct4Value, Ct6Key, Ct6Value, DatapathConfig, FrontendName, RevNat4, RevNat6, Stat,
    Svc4Key, Svc6Key, SvcValue, capacity,
};

// Service and backend tables are preallocated: an insert then takes an
// element from a free list instead of allocating, which made cold
// programming of 10,000 Services x 10 endpoints 20% faster (bench). Memory
// follows the configured capacity (--svc-capacity, --backend-capacity).
#[map]
pub static SVC4_V1: HashMap<Svc4Key, SvcValue> = HashMap::pinned(capacity::SVC, 0);
#[map]
pub static SVC6_V1: HashMap<Svc6Key, SvcValue> = HashMap::pinned(capacity::SVC, 0);
#[map]
pub static BACKEND4_V1: HashMap<u32, Backend4> = HashMap::pinned(capacity::BACKEND, 0);
#[map]
pub static BACKEND6_V1: HashMap<u32, Backend6> = HashMap::pinned(capacity::BACKEND, 0);
// Indexed by reverse-NAT id: an array lookup is inlined by the verifier.
#[map]
pub static REVNAT4_V1: Array<RevNat4> = Array::pinned(capacity::REVNAT, 0);
#[map]
pub static REVNAT6_V1: Array<RevNat6> = Array::pinned(capacity::REVNAT, 0);
// Conntrack is written per packet, so it is preallocated (LRU maps must be).
#[map]
pub static CT4_V1: LruHashMap<Ct4Key, Ct4Value> = LruHashMap::pinned(capacity::CT, 0);
#[map]
pub static CT6_V1: LruHashMap<Ct6Key, Ct6Value> = LruHashMap::pinned(capacity::CT, 0);
#[map]
pub static STATS_V1: PerCpuArray<u64> = PerCpuArray::pinned(Stat::COUNT, 0);
// Runtime settings (conntrack timeouts), written by the agent.
#[map]
pub static CONFIG_V1: Array<DatapathConfig> = Array::pinned(1, 0);
// Service port names by reverse-NAT id, for the agent's restart and
// `dsproxy inspect`; no program reads them. Not preallocated: they take
// memory for the frontends that exist only (BPF_F_NO_PREALLOC).
#[map]
pub static NAMES4_V1: HashMap<u32, FrontendName> =
    HashMap::pinned(capacity::REVNAT, aya_ebpf::bindings::BPF_F_NO_PREALLOC);
#[map]
pub static NAMES6_V1: HashMap<u32, FrontendName> =
    HashMap::pinned(capacity::REVNAT, aya_ebpf::bindings::BPF_F_NO_PREALLOC);
// Per-CPU scratch space for composing TCP RST and ICMP answers
// (`reject.rs`); not pinned, it holds no state between packets.
#[map]
pub static SCRATCH_V1: PerCpuArray<crate::reject::Scratch> = PerCpuArray::with_max_entries(1, 0);
