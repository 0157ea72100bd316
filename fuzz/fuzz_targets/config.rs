//! The config parser and validator: any text gives settings or an error that names the file,
//! and renders, never a panic.
#![no_main]

use std::path::Path;

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    match gateway::config::load_str(text, Path::new("fuzz.toml")) {
        Ok(loaded) => {
            for w in &loaded.warnings {
                let _ = w.to_string();
            }
            // Whatever validates must be a config the proxy can run on.
            assert!(
                !loaded.settings.listen.is_empty(),
                "validated config without a listener"
            );
            for route in &loaded.settings.routes {
                assert!(
                    loaded.settings.clusters.contains_key(&route.cluster),
                    "route {} names an unknown cluster {}",
                    route.name,
                    route.cluster
                );
            }
        }
        Err(e) => {
            let msg = e.to_string();
            assert!(
                msg.contains("fuzz.toml"),
                "an error that does not name the file: {msg}"
            );
        }
    }
});
