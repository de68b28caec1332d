//! Shared pieces of the examples: device selection, CLI failure handling, the NLP examples'
//! run plumbing (output directory, corpus, tokenizer and model built fresh or resumed, trainer,
//! checkpoints), plots, tables.
#![allow(dead_code)]

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device};
use candle_moe::io::model_dir as checkpoint;
use candle_moe::train::{TrainConfig, Trainer};
use candle_moe::{tokenizer, CausalLm, ModelConfig, Seq2Seq, SequenceClassifier};
use candle_nn::{VarBuilder, VarMap};
use plotters::prelude::*;

mod args;
#[allow(unused_imports)] // not every example uses both
pub use args::{parse_routing, Balance, MoeShape, RouterArgs, RunArgs};
use tokenizers::Tokenizer;

impl RunArgs {
    /// `"dense"` with `--dense`, else `"MoE"` (table headers, the model line).
    pub fn label(&self) -> &'static str {
        if self.dense {
            "dense"
        } else {
            "MoE"
        }
    }

    /// `--out`, or `runs/<name>` (`runs/<name>_dense` with `--dense`).
    pub fn out_dir(&self, name: &str) -> PathBuf {
        self.out.clone().unwrap_or_else(|| {
            PathBuf::from(if self.dense {
                format!("runs/{name}_dense")
            } else {
                format!("runs/{name}")
            })
        })
    }

    /// [`RunArgs::out_dir`], created.
    pub fn create_out_dir(&self, name: &str) -> Result<PathBuf> {
        let out = self.out_dir(name);
        std::fs::create_dir_all(&out)
            .with_context(|| format!("cannot create output directory {}", out.display()))?;
        Ok(out)
    }

    /// `--data`, or `file` in the repo's `data/`.
    #[cfg(feature = "tasks")]
    pub fn corpus(&self, file: &str) -> PathBuf {
        self.data
            .clone()
            .unwrap_or_else(|| candle_moe::data::data_dir().join(file))
    }

    /// `--tokenizer`, else the resumed model's `tokenizer.json`, else `train()`.
    pub fn tokenizer(&self, train: impl FnOnce() -> Result<Tokenizer>) -> Result<Tokenizer> {
        Ok(match (&self.tokenizer, &self.resume) {
            (Some(p), _) => tokenizer::load(p)?,
            (None, Some(r)) => tokenizer::load(&r.join("tokenizer.json"))?,
            (None, None) => train()?,
        })
    }

    /// The model and config of `--resume`, or a fresh model of config `fresh()` with its
    /// weights reseeded from `--seed` and its routers' weights scaled by
    /// `--router-init-scale`.
    pub fn model<M: ExampleModel>(
        &self,
        dev: &Device,
        router: &RouterArgs,
        fresh: impl FnOnce() -> Result<ModelConfig>,
    ) -> Result<(M, VarMap, ModelConfig)> {
        if let Some(r) = &self.resume {
            let (m, vm) = M::load_dir(r, self.dtype, dev)?;
            let cfg = m.model_config().clone();
            return Ok((m, vm, cfg));
        }
        let mut cfg = fresh()?;
        router.apply_model(&mut cfg).map_err(anyhow::Error::msg)?;
        let vm = VarMap::new();
        let m = M::build(&cfg, VarBuilder::from_varmap(&vm, self.dtype, dev))?;
        candle_moe::train::init::reseed_varmap(&vm, self.seed)?;
        scale_router_init(&vm, router.router_init_scale)?;
        Ok((m, vm, cfg))
    }

    /// The examples' schedule: `steps` at peak `lr` after a 5% warm-up, evaluation every
    /// `eval_every` steps, `--seed`, and the trainer's side of `--balance` (the auxiliary-loss
    /// coefficients are the model's, read by [`RunArgs::trainer`]).
    pub fn train_config(
        &self,
        steps: usize,
        lr: f64,
        eval_every: usize,
        router: &RouterArgs,
    ) -> Result<TrainConfig> {
        let mut t = TrainConfig {
            steps,
            lr,
            warmup_steps: (steps / 20).max(1),
            eval_every,
            seed: self.seed,
            loss_scale: (self.dtype == DType::F16).then_some(65536.0),
            ..Default::default()
        };
        router.apply_train(&mut t).map_err(anyhow::Error::msg)?;
        Ok(t)
    }

    /// A trainer over `vm` with the model's auxiliary-loss coefficients, tracking the model's
    /// selection biases (`--balance aux-free` updates them), and the optimizer and trainer
    /// state of `--resume` if given (checked against the checkpoint's manifest).
    pub fn trainer(
        &self,
        vm: &VarMap,
        cfg: TrainConfig,
        model: &ModelConfig,
        biases: &[(usize, candle_core::Tensor)],
    ) -> Result<Trainer> {
        let mut trainer = Trainer::for_model(vm, cfg, &model.moe)?;
        trainer.track_selection_biases(biases)?;
        if let Some(r) = &self.resume {
            candle_moe::train::checkpoint::resume(&mut trainer, r)?;
        }
        Ok(trainer)
    }
}

/// Multiplies the routers' freshly initialised weights by `scale` (`--router-init-scale`).
pub fn scale_router_init(vm: &VarMap, scale: f64) -> Result<()> {
    if scale == 1.0 {
        return Ok(());
    }
    let data = vm
        .data()
        .lock()
        .map_err(|_| anyhow::anyhow!("varmap lock poisoned"))?;
    for (name, var) in data.iter() {
        if name.ends_with("block_sparse_moe.gate.weight") {
            var.set(&(var.as_tensor() * scale)?)?;
        }
    }
    Ok(())
}

/// A model the NLP examples train: built fresh or loaded from a model directory.
pub trait ExampleModel: Sized {
    /// A fresh model over `vb`.
    fn build(cfg: &ModelConfig, vb: VarBuilder) -> Result<Self>;
    /// The model in a model directory, in `dtype` on `dev`.
    fn load_dir(dir: &Path, dtype: DType, dev: &Device) -> Result<(Self, VarMap)>;
    /// The model's configuration.
    fn model_config(&self) -> &ModelConfig;
    /// The files of its model directory: the Hugging Face layout for a language model that
    /// transformers can express, else the crate's layout.
    fn dir_files(
        &self,
        cfg: &ModelConfig,
        vm: &VarMap,
        tokenizer_json: &str,
        dir: &Path,
    ) -> candle_moe::Result<Vec<(String, Vec<u8>)>> {
        let tensors = candle_moe::io::safetensors::varmap_tensors(vm)?;
        checkpoint::model_files(cfg, &tensors, Some(tokenizer_json), dir)
    }
}

macro_rules! example_model {
    ($($ty:ty),*) => {$(
        impl ExampleModel for $ty {
            fn build(cfg: &ModelConfig, vb: VarBuilder) -> Result<Self> {
                Ok(<$ty>::new(cfg, vb)?)
            }
            fn load_dir(dir: &Path, dtype: DType, dev: &Device) -> Result<(Self, VarMap)> {
                Ok(<$ty>::load(dir, dtype, dev)?)
            }
            fn model_config(&self) -> &ModelConfig {
                self.config()
            }
        }
    )*};
}
example_model!(Seq2Seq, SequenceClassifier);

impl ExampleModel for CausalLm {
    fn build(cfg: &ModelConfig, vb: VarBuilder) -> Result<Self> {
        Ok(CausalLm::new(cfg, vb)?)
    }
    fn load_dir(dir: &Path, dtype: DType, dev: &Device) -> Result<(Self, VarMap)> {
        Ok(CausalLm::load(dir, dtype, dev)?)
    }
    fn model_config(&self) -> &ModelConfig {
        self.config()
    }
    fn dir_files(
        &self,
        _cfg: &ModelConfig,
        _vm: &VarMap,
        tokenizer_json: &str,
        dir: &Path,
    ) -> candle_moe::Result<Vec<(String, Vec<u8>)>> {
        if self.comm().is_none() {
            return self.checkpoint_files(Some(tokenizer_json), dir);
        }
        // Expert-parallel: a collective; rank 0 writes the gathered single-process model.
        match self.gathered()? {
            Some(full) => full.checkpoint_files(Some(tokenizer_json), dir),
            None => Ok(vec![]),
        }
    }
}

/// Saves the model directory (config, weights, tokenizer) and the trainer state into `dir` as
/// one consistent checkpoint ([`candle_moe::train::checkpoint`]): every `checkpoint_every`
/// steps and at the end of training (over several ranks a collective, rank 0 writing).
pub struct Checkpoints<'a, M: ExampleModel> {
    pub dir: &'a Path,
    model: &'a M,
    cfg: &'a ModelConfig,
    vm: &'a VarMap,
    tokenizer_json: String,
}

impl<'a, M: ExampleModel> Checkpoints<'a, M> {
    pub fn new(
        dir: &'a Path,
        model: &'a M,
        cfg: &'a ModelConfig,
        vm: &'a VarMap,
        tok: &Tokenizer,
    ) -> Result<Self> {
        Ok(Self {
            dir,
            model,
            cfg,
            vm,
            tokenizer_json: tokenizer::to_json(tok)?,
        })
    }

    /// One checkpoint of the model and `trainer`'s state.
    pub fn save(&self, trainer: &Trainer) -> candle_moe::Result<()> {
        let files = self
            .model
            .dir_files(self.cfg, self.vm, &self.tokenizer_json, self.dir)?;
        candle_moe::train::checkpoint::save(self.dir, files, trainer)
    }
}

/// `cpu` or `cuda` (the latter needs `--features cuda`).
pub fn device(name: &str) -> Result<Device> {
    match name {
        "cpu" => Ok(Device::Cpu),
        "cuda" => {
            if !cfg!(feature = "cuda") {
                bail!("this binary was built without CUDA: rebuild with `--features cuda`")
            }
            Ok(Device::new_cuda(0)?)
        }
        other => bail!("unknown device `{other}` (expected cpu or cuda)"),
    }
}

/// Runs `f`, printing a one-line error and exiting with code 1 instead of a panic backtrace.
pub fn main_wrapper(f: impl FnOnce() -> Result<()>) {
    if let Err(e) = f() {
        let chain: Vec<String> = e.chain().map(|c| c.to_string()).collect();
        eprintln!("error: {}", chain.join(": "));
        std::process::exit(1);
    }
}

/// A series for a line plot.
pub struct Series {
    pub name: String,
    pub points: Vec<(f64, f64)>,
}

/// Draws one or more panels of line plots against training steps into a PNG.
#[allow(dead_code)]
pub fn plot_panels(path: &Path, title: &str, panels: &[(&str, &str, Vec<Series>)]) -> Result<()> {
    plot_panels_x(path, title, "step", panels)
}

/// Draws one or more panels of line plots into a PNG, with `x_label` on the x axes.
pub fn plot_panels_x(
    path: &Path,
    title: &str,
    x_label: &str,
    panels: &[(&str, &str, Vec<Series>)],
) -> Result<()> {
    let root = BitMapBackend::new(path, (1000, 380 * panels.len() as u32)).into_drawing_area();
    root.fill(&WHITE)?;
    let root = root.titled(title, ("sans-serif", 22))?;
    let areas = root.split_evenly((panels.len(), 1));
    for (area, (ptitle, ylabel, series)) in areas.iter().zip(panels) {
        let pts: Vec<(f64, f64)> = series
            .iter()
            .flat_map(|s| s.points.iter().copied())
            .collect();
        if pts.is_empty() {
            continue;
        }
        let (x0, x1) = pts
            .iter()
            .fold((f64::MAX, f64::MIN), |a, p| (a.0.min(p.0), a.1.max(p.0)));
        let (y0, y1) = pts
            .iter()
            .fold((f64::MAX, f64::MIN), |a, p| (a.0.min(p.1), a.1.max(p.1)));
        let pad = ((y1 - y0) * 0.05).max(1e-6);
        let mut chart = ChartBuilder::on(area)
            .caption(*ptitle, ("sans-serif", 18))
            .margin(10)
            .x_label_area_size(35)
            .y_label_area_size(55)
            .build_cartesian_2d(x0..x1.max(x0 + 1e-9), (y0 - pad)..(y1 + pad))?;
        chart
            .configure_mesh()
            .x_desc(x_label)
            .y_desc(*ylabel)
            .draw()?;
        for (i, s) in series.iter().enumerate() {
            let color = Palette99::pick(i).to_rgba();
            chart
                .draw_series(LineSeries::new(
                    s.points.iter().copied(),
                    color.stroke_width(2),
                ))?
                .label(s.name.clone())
                .legend(move |(x, y)| {
                    PathElement::new(vec![(x, y), (x + 18, y)], color.stroke_width(2))
                });
        }
        chart
            .configure_series_labels()
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK)
            .draw()?;
    }
    root.present()?;
    Ok(())
}

/// Draws the routing of every sparse layer over training into `path`: one panel per layer with
/// each expert's share of the layer's routed assignments (summed over the last 20 steps; the
/// uniform share is `1/E`), and a last panel with each layer's mean router entropy. Returns
/// whether it drew: a history without sparse layers draws nothing, a failure is only a warning.
pub fn plot_routing(path: &Path, title: &str, history: &[candle_moe::train::StepStats]) -> bool {
    if history.iter().all(|s| s.layers.is_empty()) {
        return false;
    }
    match plot_routing_panels(path, title, history) {
        Ok(()) => true,
        Err(e) => {
            eprintln!("warning: could not draw {}: {e}", path.display());
            false
        }
    }
}

fn plot_routing_panels(
    path: &Path,
    title: &str,
    history: &[candle_moe::train::StepStats],
) -> Result<()> {
    let w = 20usize.min(history.len()).max(1);
    let mut layers: Vec<usize> = history
        .iter()
        .flat_map(|s| s.layers.iter().map(|l| l.layer))
        .collect();
    layers.sort_unstable();
    layers.dedup();
    let mut titles = vec![];
    let mut panels = vec![];
    let mut entropy = vec![];
    for &layer in &layers {
        let of =
            |s: &candle_moe::train::StepStats| s.layers.iter().find(|l| l.layer == layer).cloned();
        let experts = history
            .iter()
            .filter_map(of)
            .map(|l| l.expert_counts.len())
            .max()
            .unwrap_or(0);
        let mut shares = vec![vec![]; experts];
        for end in 1..=history.len() {
            let win = &history[end.saturating_sub(w)..end];
            let step = win[win.len() - 1].step as f64;
            let ls: Vec<_> = win.iter().filter_map(of).collect();
            let total = ls.iter().map(|l| l.assignments).sum::<usize>().max(1) as f64;
            for (e, series) in shares.iter_mut().enumerate() {
                let c: usize = ls.iter().filter_map(|l| l.expert_counts.get(e)).sum();
                series.push((step, c as f64 / total));
            }
        }
        let series: Vec<Series> = shares
            .into_iter()
            .enumerate()
            .map(|(e, points)| Series {
                name: format!("expert {e}"),
                points,
            })
            .collect();
        titles.push(format!(
            "layer {layer}: share of routed assignments per expert (last {w} steps; uniform {:.3})",
            1.0 / experts.max(1) as f64
        ));
        panels.push(series);
        entropy.push(Series {
            name: format!("layer {layer}"),
            points: history
                .iter()
                .filter_map(|s| of(s).map(|l| (s.step as f64, l.entropy)))
                .collect(),
        });
    }
    let mut all: Vec<(&str, &str, Vec<Series>)> = titles
        .iter()
        .zip(panels)
        .map(|(t, s)| (t.as_str(), "share", s))
        .collect();
    all.push(("mean router entropy per layer", "nats", entropy));
    plot_panels(path, title, &all)
}

/// Prints a table with a header row.
pub fn print_table(header: &[&str], rows: &[Vec<String>]) {
    let mut w: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for r in rows {
        for (i, c) in r.iter().enumerate() {
            w[i] = w[i].max(c.len());
        }
    }
    let line = |cells: Vec<String>| {
        let s: Vec<String> = cells
            .iter()
            .enumerate()
            .map(|(i, c)| format!("{:<w$}", c, w = w[i]))
            .collect();
        println!("| {} |", s.join(" | "));
    };
    line(header.iter().map(|s| s.to_string()).collect());
    println!(
        "|{}|",
        w.iter()
            .map(|n| "-".repeat(n + 2))
            .collect::<Vec<_>>()
            .join("|")
    );
    for r in rows {
        line(r.clone());
    }
}
