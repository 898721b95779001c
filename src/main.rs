//! The `tilefeat` binary: parse, run, print errors once with their chain, exit with the
//! documented code (see `tilefeat --help` and the README).

use clap::Parser;

fn main() {
    tilefeat::alloc::tune_heap();
    // Ctrl-C, scancel, a time limit: said, temporaries removed, exit 128 + signal.
    tilefeat::interrupt::install();
    // A panic (a bug, or libtorch failing inside an operation) is reported like any error.
    std::panic::set_hook(Box::new(|info| {
        if tilefeat::error::PANIC_IS_CAUGHT.with(|f| f.get()) {
            return; // caught, and reported as an error naming the tile or batch
        }
        let msg = info
            .payload()
            .downcast_ref::<String>()
            .map(String::as_str)
            .or_else(|| info.payload().downcast_ref::<&str>().copied())
            .unwrap_or("unknown panic");
        // A tch panic carries libtorch's C++ backtrace on its one (escaped) line: cut it.
        let first = tilefeat::error::libtorch_message(msg);
        eprintln!("tilefeat: error: internal failure: {first}");
    }));
    let cli = tilefeat::cli::Cli::parse();
    let code = match std::panic::catch_unwind(|| tilefeat::app::run(cli)) {
        Ok(Ok(())) => 0,
        Ok(Err(e)) => {
            eprintln!("tilefeat: error: {e:#}");
            tilefeat::error::kind_of(&e) as i32
        }
        Err(_) => tilefeat::error::ExitKind::Internal as i32,
    };
    tilefeat::interrupt::yield_to_signal();
    std::process::exit(code);
}
