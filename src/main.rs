fn main() -> std::process::ExitCode {
    dalil::cli::main()
}
