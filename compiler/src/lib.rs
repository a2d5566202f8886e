//! The moec compiler.
