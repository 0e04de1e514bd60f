//! `deltadoc`: the command line is [`deltadoc::cli`]; this only hands it the process.

fn main() {
    std::process::exit(deltadoc::cli::run());
}
