//! The datapath's maps. Names match `proxy_common::names` and are pinned by
//! name under the agent's pin directory; capacities here are defaults that
//! the agent overrides at load time (the table is `proxy_common::maps`).
use aya_ebpf::{
    bindings::BPF_F_NO_PREALLOC,
    btf_maps::SkStorage,
    macros::{btf_map, map},
    maps::{Array, HashMap, LpmTrie, LruHashMap, PerCpuArray},
};
use proxy_common::{
    AffMatchKey, AffinityKey, AffinityValue, Backend4, Backend6, CtFwd4, CtFwd6, CtKey4, CtKey6, CtRev4, CtRev6,
    DatapathConfig, FragKey4, FragKey6, FragPorts, FrontendName, IfaceInfo, RevNat4, RevNat6, SockConn4, SockConn6,
    SockFwd4, SockFwd6, SockKey4, SockKey6, SockRev4, SockRev6, SockRevKey4, SockRevKey6, SrcRange4, SrcRange6,
    StatSlot, Svc4Key, Svc6Key, SvcValue, capacity, filter,
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
// Frontend by id (cleared when it goes): the agent's bookkeeping and
// `inspect`, and the check that a live flow's frontend still exists.
#[map]
pub static REVNAT4_V1: Array<RevNat4> = Array::pinned(capacity::REVNAT, 0);
#[map]
pub static REVNAT6_V1: Array<RevNat6> = Array::pinned(capacity::REVNAT, 0);
// Conntrack is written per packet, so it is preallocated (LRU maps must be).
#[map]
pub static CT4_FWD_V3: LruHashMap<CtKey4, CtFwd4> = LruHashMap::pinned(capacity::CT, 0);
#[map]
pub static CT4_REV_V3: LruHashMap<CtKey4, CtRev4> = LruHashMap::pinned(capacity::CT, 0);
#[map]
pub static CT6_FWD_V3: LruHashMap<CtKey6, CtFwd6> = LruHashMap::pinned(capacity::CT, 0);
#[map]
pub static CT6_REV_V3: LruHashMap<CtKey6, CtRev6> = LruHashMap::pinned(capacity::CT, 0);
// Ports of fragmented datagrams, from their first fragment.
#[map]
pub static FRAG4_V1: LruHashMap<FragKey4, FragPorts> = LruHashMap::pinned(capacity::FRAG, 0);
#[map]
pub static FRAG6_V1: LruHashMap<FragKey6, FragPorts> = LruHashMap::pinned(capacity::FRAG, 0);
#[map]
pub static AFFINITY_V1: LruHashMap<AffinityKey, AffinityValue> = LruHashMap::pinned(capacity::AFFINITY, 0);
#[map]
pub static AFFMATCH4_V1: HashMap<AffMatchKey, u8> = HashMap::pinned(capacity::BACKEND, 0);
#[map]
pub static AFFMATCH6_V1: HashMap<AffMatchKey, u8> = HashMap::pinned(capacity::BACKEND, 0);
#[map]
pub static SRCRANGE4_V1: LpmTrie<SrcRange4, u8> = LpmTrie::pinned(capacity::SRCRANGE, 0);
#[map]
pub static SRCRANGE6_V1: LpmTrie<SrcRange6, u8> = LpmTrie::pinned(capacity::SRCRANGE, 0);
#[map]
pub static NODEPORT4_V1: HashMap<[u8; 4], u8> = HashMap::pinned(capacity::NODEPORT, 0);
#[map]
pub static NODEPORT6_V1: HashMap<[u8; 16], u8> = HashMap::pinned(capacity::NODEPORT, 0);
#[map]
pub static SOCK4_FWD_V1: LruHashMap<SockKey4, SockFwd4> = LruHashMap::pinned(capacity::SOCK, 0);
#[map]
pub static SOCK4_REV_V1: LruHashMap<SockRevKey4, SockRev4> = LruHashMap::pinned(capacity::SOCK, 0);
#[map]
pub static SOCK6_FWD_V1: LruHashMap<SockKey6, SockFwd6> = LruHashMap::pinned(capacity::SOCK, 0);
#[map]
pub static SOCK6_REV_V1: LruHashMap<SockRevKey6, SockRev6> = LruHashMap::pinned(capacity::SOCK, 0);
// What each connected socket connected to, in the socket itself: it goes
// with the socket. A BTF map (the kernel requires BTF for socket storage);
// the agent pins it by name like the others.
#[btf_map]
pub static SOCK4_CONN_V1: SkStorage<SockConn4> = SkStorage::new();
#[btf_map]
pub static SOCK6_CONN_V1: SkStorage<SockConn6> = SkStorage::new();
#[map]
pub static IFACES_V1: HashMap<u32, IfaceInfo> = HashMap::pinned(capacity::IFACES, 0);
#[map]
pub static STATS_V3: PerCpuArray<u64> = PerCpuArray::pinned(StatSlot::ENTRIES, 0);
// Runtime settings (conntrack timeouts, socket LB), written by the agent.
#[map]
pub static CONFIG_V2: Array<DatapathConfig> = Array::pinned(1, 0);
// Service port names by reverse-NAT id, for the agent's restart and
// `dsproxy inspect`; no program reads them. Not preallocated: they take
// memory for the frontends that exist only (BPF_F_NO_PREALLOC).
#[map]
pub static NAMES4_V1: HashMap<u32, FrontendName> = HashMap::pinned(capacity::REVNAT, BPF_F_NO_PREALLOC);
#[map]
pub static NAMES6_V1: HashMap<u32, FrontendName> = HashMap::pinned(capacity::REVNAT, BPF_F_NO_PREALLOC);
// Which destination addresses may be frontends (`proxy_common::filter`).
#[map]
pub static FILTER4_V1: Array<u64> = Array::pinned(filter::WORDS, 0);
#[map]
pub static FILTER6_V1: Array<u64> = Array::pinned(filter::WORDS, 0);
