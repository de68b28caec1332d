//! `model.safetensors` bytes: `checkpoint::parse_safetensors` then `checkpoint::fill_varmap`
//! into the `VarMap` of a fixed tiny `CausalLm` (see `candle_moe_fuzz::tiny_config`). When the
//! weights load, the model runs one short forward on them (NaN/Inf weights included). Errors are
//! fine; panics are bugs.
#![no_main]

use std::path::Path;
use std::sync::OnceLock;

use candle_core::{DType, Device};
use candle_moe::{CausalLm, ModelConfig};
use candle_nn::{VarBuilder, VarMap};
use libfuzzer_sys::fuzz_target;

struct Tiny {
    cfg: ModelConfig,
    varmap: VarMap,
    model: CausalLm,
}

fn tiny() -> &'static Tiny {
    static TINY: OnceLock<Tiny> = OnceLock::new();
    TINY.get_or_init(|| {
        let cfg = candle_moe_fuzz::tiny_config();
        let varmap = VarMap::new();
        let model = CausalLm::new(&cfg, VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu))
            .expect("the tiny model builds");
        Tiny { cfg, varmap, model }
    })
}

fuzz_target!(|data: &[u8]| {
    let t = tiny();
    let path = Path::new("model.safetensors");
    let Ok(tensors) = candle_moe::io::safetensors::parse_safetensors(data, path, DType::F32, &Device::Cpu)
    else {
        return;
    };
    if candle_moe::io::safetensors::fill_varmap(&t.varmap, &tensors, path).is_ok() {
        candle_moe_fuzz::tiny_forward(&t.model, &t.cfg);
    }
});
