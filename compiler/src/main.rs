use std::io::IsTerminal;

fn main() {
    let stdout = std::io::stdout();
    let stderr = std::io::stderr();
    let tty = stderr.is_terminal();
    let code = moec::cli::run(
        std::env::args_os(),
        &mut stdout.lock(),
        &mut stderr.lock(),
        tty,
    );
    std::process::exit(code);
}
