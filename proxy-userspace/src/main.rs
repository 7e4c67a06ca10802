//! `dsproxy`: the agent binary. Everything lives in the library (`dsproxy::cli`)
//! so that the integration tests can build the very same binary.

/// mimalloc keeps small objects in size-class pages without a per-object
/// header. The agent's state is millions of small allocations (strings,
/// tree nodes, endpoint lists), which glibc's allocator pads and fragments:
/// at 10,000 Services x 10 endpoints the agent peaked at 143 MiB with
/// glibc and 111 MiB with mimalloc set as in `main` (docs/performance.md).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// `mi_option_purge_delay` in mimalloc 3's `mimalloc.h` (`libmimalloc-sys`
/// names only the options its versions share).
const MI_OPTION_PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;

fn main() -> anyhow::Result<()> {
    // SAFETY: plain setters of the allocator's options, called before the
    // agent allocates its state; no memory is involved.
    unsafe {
        // Give freed pages back at once: the start-up's transient buffers
        // (parsed documents, batches of map writes) then do not add to the
        // resident peak. Arena memory is committed as it is used
        // (`MI_DEFAULT_ARENA_EAGER_COMMIT=0`, set at compile time in
        // .cargo/config.toml: mimalloc reads that option before `main`).
        libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, 0);
    }
    dsproxy::cli::main()
}
