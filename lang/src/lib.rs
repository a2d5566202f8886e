//! The `.moe` language front end.
//!
//! `source text -> lexer -> parser (ast, spans) -> checker -> validated spec`.
//! The entry point for most users is [`check_source`]; `moec fmt` uses
//! [`format_source`]; `moec import` uses [`import`].

pub mod ast;
pub mod diag;
pub mod lexer;
pub mod parser;
pub mod span;
