//! What a MoE checkpoint is, from its `config.json` alone (no weights are read): family, layer
//! layout, routing, total and active parameters, and the memory its weights need.
//!
//! ```sh
//! cargo run --release --example inspect -- tests/fixtures/real_configs/qwen3-30b-a3b/config.json
//! cargo run --release --example inspect -- path/to/checkpoint_dir
//! cargo run --release --example inspect -- Qwen/Qwen3-30B-A3B      # from the hf-hub cache
//! ```

use candle_moe::io::hub::LoadOptions;
use candle_moe::io::inspect::{inspect, FfnLayout, Inventory};
use clap::Parser;

#[derive(Parser, Debug)]
#[command(about = "Describe a MoE checkpoint from its config.json")]
struct Args {
    /// A config.json, a checkpoint directory, or a hub model id in the local cache.
    source: String,
    /// Also list every parameter with its shape.
    #[arg(long)]
    params: bool,
}

fn billions(n: u128) -> String {
    format!("{:.3}B", n as f64 / 1e9)
}

fn gib(bytes: f64) -> String {
    format!("{:.1} GiB", bytes / (1u64 << 30) as f64)
}

/// Runs of equal layers: `0-2 dense, 3-47 sparse`.
fn layout(inv: &Inventory) -> String {
    let l = inv.layer_layout();
    let mut out: Vec<String> = vec![];
    let mut start = 0;
    for i in 1..=l.len() {
        if i == l.len() || l[i] != l[start] {
            let kind = match l[start] {
                FfnLayout::Dense => "dense",
                FfnLayout::Sparse => "sparse",
            };
            let range = if i - 1 == start {
                format!("{start}")
            } else {
                format!("{start}-{}", i - 1)
            };
            out.push(format!("{range} {kind}"));
            start = i;
        }
    }
    out.join(", ")
}

fn main() -> anyhow::Result<()> {
    let a = Args::parse();
    let inv = inspect(&a.source, &LoadOptions::default())?;
    let c = &inv.config;
    let m = &c.moe;
    println!("config:        {}", inv.config_path.display());
    match inv.family {
        Some(f) => println!("family:        {f:?}"),
        None => println!("family:        candle-moe config"),
    }
    println!(
        "shape:         vocab {}, hidden {}, {} layers, {} heads ({} kv, head_dim {})",
        c.vocab_size,
        c.hidden_size,
        c.num_layers,
        c.num_heads,
        c.num_kv_heads,
        c.head_dim()
    );
    if let Some(mla) = &c.mla {
        println!(
            "attention:     multi-head latent (q_lora_rank {:?}, kv_lora_rank {}, qk {} + {} rope, v {})",
            mla.q_lora_rank,
            mla.kv_lora_rank,
            mla.qk_nope_head_dim,
            mla.qk_rope_head_dim,
            mla.v_head_dim
        );
    }
    if let Some(w) = c.sliding_window {
        let sliding = (0..c.num_layers)
            .filter(|&l| c.layer_window(l).is_some())
            .count();
        println!(
            "attention:     sliding window {w} in {sliding} of {} layers",
            c.num_layers
        );
    }
    if let Some(s) = &c.rope_scaling {
        println!("rope scaling:  {s:?}");
    }
    println!("layers:        {}", layout(&inv));
    println!(
        "routing:       {:?} scores{}{}{}",
        m.scoring,
        if m.selection_bias {
            ", selection bias"
        } else {
            ""
        },
        if m.n_group > 1 {
            format!(
                ", {} of {} groups ({:?})",
                m.topk_group, m.n_group, m.group_score
            )
        } else {
            String::new()
        },
        if m.routed_scaling_factor != 1.0 {
            format!(", scaled by {}", m.routed_scaling_factor)
        } else {
            String::new()
        }
    );
    println!(
        "experts:       {} routed of width {}, top-{}{}, {}",
        m.num_experts,
        m.intermediate_size,
        m.top_k,
        if m.norm_topk_prob {
            " (renormalised)"
        } else {
            ""
        },
        if m.shared_expert_intermediate_size > 0 {
            format!(
                "shared expert of width {}",
                m.shared_expert_intermediate_size
            )
        } else {
            "no shared expert".to_string()
        }
    );
    println!("parameters:    {} total", billions(inv.total()));
    println!(
        "active/token:  {} ({} without the input embedding)",
        billions(inv.active()),
        billions(inv.active_without_input_embedding())
    );
    println!(
        "memory:        f32 {}, bf16 {}, as stored ({}{}) {}",
        gib(inv.bytes_at(4.0)),
        gib(inv.bytes_at(2.0)),
        inv.stored_dtype.as_deref().unwrap_or("bf16 assumed"),
        inv.quantization
            .as_deref()
            .map(|q| format!(" + {q}"))
            .unwrap_or_default(),
        gib(inv.stored_bytes())
    );
    if a.params {
        for (n, s) in &inv.params {
            println!("{n} {s:?}");
        }
    }
    Ok(())
}
