//! The canonical formatter (being written).
use crate::diag::Diagnostic;
pub fn format_source(source: &str) -> Result<String, Vec<Diagnostic>> {
    Ok(source.to_string())
}
