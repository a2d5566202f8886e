//! Opening the files a user names. Only regular files are read: opening a
//! FIFO blocks until something writes to it, and a device can stream
//! forever, so either would hang a command that meant to read a plan, a
//! layer or a checkpoint. The check comes before the open for that reason.

use std::fs::File;
use std::io;
use std::path::Path;

/// `Ok` when `path` is a regular file (after following links).
pub fn regular(path: &Path) -> io::Result<()> {
    let meta = std::fs::metadata(path)?;
    if meta.is_file() {
        Ok(())
    } else {
        let what = if meta.is_dir() {
            "a directory"
        } else {
            "not a regular file (a FIFO, socket or device), which could block forever"
        };
        Err(io::Error::new(io::ErrorKind::InvalidInput, what))
    }
}

/// Opens a regular file for reading.
pub fn open(path: &Path) -> io::Result<File> {
    regular(path)?;
    File::open(path)
}

/// Reads a regular file as UTF-8 text.
pub fn read_to_string(path: &Path) -> io::Result<String> {
    regular(path)?;
    std::fs::read_to_string(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_fifo_is_refused_without_blocking() {
        let dir = std::env::temp_dir().join(format!("moec-fifo-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("{e}"));
        let fifo = dir.join("plan.json");
        let made = std::process::Command::new("mkfifo").arg(&fifo).status();
        if made.is_ok_and(|s| s.success()) {
            let e = read_to_string(&fifo).expect_err("a FIFO is not read");
            assert!(e.to_string().contains("FIFO"), "{e}");
        }
        let e = open(&dir).expect_err("a directory is not opened");
        assert!(e.to_string().contains("directory"), "{e}");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
