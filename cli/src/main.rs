fn main() -> std::process::ExitCode {
    gatehouse::main()
}
