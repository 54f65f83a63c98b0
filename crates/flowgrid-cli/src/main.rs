use std::process::ExitCode;

fn main() -> ExitCode {
    flowgrid_cli::main()
}
