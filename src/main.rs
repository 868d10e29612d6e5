// jemalloc instead of glibc's allocator. Under load, glibc's malloc spent about a quarter of
// `dalil all`'s CPU (perf: `_int_malloc`, `unlink_chunk`, `malloc_consolidate`: every request
// of 1 KiB or more consolidates the fast bins, and requests, records and batches are mostly
// that size). With jemalloc the same 20,000-item bench used 10.4–11.5 CPU seconds instead of
// 11.3–14.2, at the same peak RSS (docs/performance.md).
#[global_allocator]
static GLOBAL: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

fn main() -> std::process::ExitCode {
    dalil::cli::main()
}
