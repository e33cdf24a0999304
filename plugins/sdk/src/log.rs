//! Logging through the host: the one thing a policy imports.
//!
//! In a wasm build this calls the contract's `log` import. In a native build
//! (the host's native twins) it goes to a sink the host installs with
//! [`set_native_sink`], or nowhere.

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Level {
    Error,
    Warn,
    Info,
    Debug,
}

pub fn error(message: &str) {
    emit(Level::Error, message)
}
pub fn warn(message: &str) {
    emit(Level::Warn, message)
}
pub fn info(message: &str) {
    emit(Level::Info, message)
}
pub fn debug(message: &str) {
    emit(Level::Debug, message)
}

#[cfg(target_arch = "wasm32")]
fn emit(level: Level, message: &str) {
    crate::guest::log(level, message)
}

#[cfg(not(target_arch = "wasm32"))]
static NATIVE_SINK: std::sync::OnceLock<fn(Level, &str)> = std::sync::OnceLock::new();

/// Where native twins' log lines go (first call wins).
#[cfg(not(target_arch = "wasm32"))]
pub fn set_native_sink(sink: fn(Level, &str)) {
    let _ = NATIVE_SINK.set(sink);
}

#[cfg(not(target_arch = "wasm32"))]
fn emit(level: Level, message: &str) {
    if let Some(sink) = NATIVE_SINK.get() {
        sink(level, message)
    }
}
