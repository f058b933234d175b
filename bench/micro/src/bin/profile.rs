//! Callgrind driver: `profile FORMAT SIZE ITERATIONS` splices one generated body
//! ITERATIONS times (FORMAT as in `FORMATS`, SIZE `1KB` or `64KB`). Run under
//! `valgrind --tool=callgrind --toggle-collect='ibex_directive_micro::run_splices*'`
//! to count the instructions of the splice alone (body generation excluded).

use ibex_directive_micro::{body, run_splices, FORMATS, SIZES};

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.len() != 4 {
        eprintln!("usage: profile FORMAT SIZE ITERATIONS");
        std::process::exit(2);
    }
    let format = FORMATS.iter().find(|(n, _)| *n == args[1]).map(|(_, f)| *f);
    let size = SIZES.iter().find(|(n, _)| *n == args[2]).map(|(_, s)| *s);
    let iterations: Option<usize> = args[3].parse().ok();
    let (Some(format), Some(size), Some(iterations)) = (format, size, iterations) else {
        eprintln!("unknown format, size or iteration count");
        std::process::exit(2);
    };
    let b = body(format, size);
    let total = run_splices(format, &b, iterations);
    if total == 0 {
        eprintln!("splice refused the body");
        std::process::exit(1);
    }
    println!("{total}");
}
