//! The settings file: any text either fails to parse or validate with an
//! error, or yields settings every derived piece can be built from — never a
//! panic (a zero interval once panicked every session).
#![no_main]

use libfuzzer_sys::fuzz_target;
use sttproxy::Settings;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(settings) = toml::from_str::<Settings>(text) else {
        return;
    };
    if settings.validate().is_err() {
        return;
    }
    let _ = settings.session_settings();
    let _ = settings.pool_tuning();
    let _ = settings.backend_specs();
});
