//! The `.moe` language front end.
//!
//! `source text -> lexer -> parser (ast, spans) -> checker -> validated spec`.
//! The entry point for most users is [`check_source`]; `moec fmt` uses
//! [`format_source`]; `moec import` uses [`import`].

// Errors are diagnostics with labels and hints; they are built on the cold
// path only, so their size in a `Result` costs nothing that matters.
#![allow(clippy::result_large_err)]

pub mod ast;
pub mod check;
pub mod diag;
pub mod eval;
pub mod lexer;
pub mod parser;
pub mod span;
pub mod spec;

pub use diag::{render, Diagnostic, Severity};
pub use spec::{Derived, Program};

/// The outcome of checking one source file.
#[derive(Clone, Debug)]
pub struct Checked {
    /// Present when the file has no error.
    pub program: Option<(Program, Derived)>,
    /// Errors and warnings, in source order.
    pub diagnostics: Vec<Diagnostic>,
}

impl Checked {
    pub fn has_errors(&self) -> bool {
        self.diagnostics.iter().any(Diagnostic::is_error)
    }
}

/// Parses and checks a `.moe` source text.
pub fn check_source(source: &str) -> Checked {
    let parsed = parser::parse(source);
    let syntax_ok = !parsed.has_errors();
    let mut diagnostics = parsed.diagnostics;
    let mut program = None;
    // Checking a tree that lost entries to syntax errors would report them as
    // missing; the syntax errors come first, the rest on the next run.
    if let (Some(file), false) = (&parsed.file, !syntax_ok) {
        let (p, mut more) = check::check(file);
        diagnostics.append(&mut more);
        if !diagnostics.iter().any(Diagnostic::is_error) {
            program = p;
        }
    }
    diagnostics.sort_by_key(|d| (d.span.start, d.span.end));
    Checked {
        program,
        diagnostics,
    }
}
pub mod fmt;
pub mod import;
pub use fmt::format_source;
