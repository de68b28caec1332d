//! The trainer's state files. The first input byte picks the file the rest replaces in a valid
//! training checkpoint of the fixed tiny model (see `candle_moe_fuzz::TrainerFixture`):
//! 0 = `trainer/trainer_state.json`, 1 = `trainer/optimizer.safetensors`, 2 = the manifest
//! `checkpoint.json`, 3 = `trainer_state.json` read by `Trainer::load_state` directly. Then the
//! checkpoint is resumed (`checkpoint::resume`, or `load_state`), and when that succeeds one
//! optimizer step runs from the restored state (any step count, moments or history). A failed
//! load must leave the trainer as it was. Errors are fine; panics are bugs.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&which, rest)) = data.split_first() else {
        return;
    };
    candle_moe_fuzz::with_trainer_fixture(|fx| {
        let (file, direct) = match which % 4 {
            0 => (fx.checkpoint.join("trainer/trainer_state.json"), false),
            1 => (fx.checkpoint.join("trainer/optimizer.safetensors"), false),
            2 => (fx.checkpoint.join("checkpoint.json"), false),
            _ => (fx.state_dir.join("trainer_state.json"), true),
        };
        let before = fx.trainer.state.step;
        if fx.restore_files().is_err() || std::fs::write(&file, rest).is_err() {
            return;
        }
        let loaded = if direct {
            fx.trainer.load_state(&fx.state_dir)
        } else {
            candle_moe::train::checkpoint::resume(&mut fx.trainer, &fx.checkpoint)
        };
        match loaded {
            Ok(()) => fx.one_step(),
            Err(_) => assert_eq!(fx.trainer.state.step, before, "a failed load changed the trainer"),
        }
        fx.reset();
    });
});
