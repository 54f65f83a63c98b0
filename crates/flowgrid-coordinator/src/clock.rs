//! The coordinator's clock: the shell reads time; the engine receives it as an input.

use flowgrid_model::Millis;

/// Milliseconds since the Unix epoch, now.
pub fn now_ms() -> Millis {
    let since_epoch = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
    since_epoch.as_millis() as Millis
}
