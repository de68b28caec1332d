//! `model.safetensors.index.json` bytes: written into a directory that holds a real sharded
//! checkpoint of the fixed tiny model (`config.json` + two shards, see
//! `candle_moe_fuzz::sharded_tiny_dir`), which is then loaded with `CausalLm::from_pretrained`.
//! Shard names that climb out of the directory, absolute paths, duplicated or missing tensors
//! must give errors; when the load succeeds, the model runs one short forward. Errors are fine;
//! panics are bugs.
#![no_main]

use candle_moe::io::hub::LoadOptions;
use candle_moe::CausalLm;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let dir = candle_moe_fuzz::sharded_tiny_dir();
    if std::fs::write(dir.join("model.safetensors.index.json"), data).is_err() {
        return;
    }
    let Some(src) = dir.to_str() else { return };
    if let Ok(model) = CausalLm::from_pretrained(src, &LoadOptions::default()) {
        // A load that succeeded through a shard name leaving the directory read
        // `../outside.safetensors` (or another file outside): that is the bug this target hunts.
        let escaped = serde_json::from_slice::<serde_json::Value>(data)
            .ok()
            .and_then(|v| v.get("weight_map").and_then(|m| m.as_object()).cloned())
            .is_some_and(|m| {
                m.values()
                    .filter_map(|f| f.as_str())
                    .any(|f| f.contains('/') || f.contains('\\') || f.contains(".."))
            });
        assert!(!escaped, "loaded through a shard name that is not a plain file name");
        candle_moe_fuzz::tiny_forward(&model, &candle_moe_fuzz::tiny_config());
    }
});
