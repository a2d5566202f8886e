//! The moec compiler and its command line.
//!
//! A checked `.moe` program is lowered into a per-rank dataflow IR ([`ir`]),
//! rewritten with egg ([`rules`]), extracted by an overlap-aware cost model
//! ([`cost`]), scheduled onto streams with events and a buffer plan
//! ([`schedule`]) and emitted as a runtime [`moec_runtime::Plan`]. The
//! [`timeline`] simulator replays a plan to predict its time.

pub mod bench;
pub mod cli;
pub mod compile;
pub mod cost;
pub mod destinations;
pub mod explain;
pub mod ir;
pub mod kernels_cmd;
pub mod place;
pub mod rules;
pub mod run;
pub mod schedule;
pub mod source_edit;
pub mod timeline;
pub mod tune;
