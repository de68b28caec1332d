//! Shared pieces of the examples: device selection, CLI failure handling, plots, tables.
#![allow(dead_code)]

use std::path::Path;

use anyhow::{bail, Result};
use candle_core::Device;
use plotters::prelude::*;

/// Options every training example takes.
#[derive(clap::Args, Debug, Clone)]
pub struct RunArgs {
    /// cpu or cuda
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// Seed (init, batches, sampling).
    #[arg(long, default_value_t = 42)]
    pub seed: u64,
    /// Output directory (model directory and plots).
    #[arg(long)]
    pub out: Option<std::path::PathBuf>,
    /// Train the dense baseline with the same active parameters instead of the MoE.
    #[arg(long)]
    pub dense: bool,
    /// Resume training from this model directory.
    #[arg(long)]
    pub resume: Option<std::path::PathBuf>,
    /// Use this tokenizer.json instead of training one.
    #[arg(long)]
    pub tokenizer: Option<std::path::PathBuf>,
    /// Corpus file (default: the one the repo ships in data/).
    #[arg(long)]
    pub data: Option<std::path::PathBuf>,
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
