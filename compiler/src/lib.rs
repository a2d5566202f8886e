//! The moec compiler and its command line.
//!
//! Today: the command line over the `.moe` front end (`check`, `fmt`, `import`,
//! `build` printing the validated layer). The dataflow IR, rewrites, cost model
//! and plan emission land here next (see ARCHITECTURE.md).

pub mod cli;
