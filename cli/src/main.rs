/// The per-command path allocates and frees small buffers and events from
/// several threads; mimalloc serves that with thread-local free lists, where
/// glibc's malloc spent a tenth of the worker's CPU under load.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    gatehouse::main()
}
