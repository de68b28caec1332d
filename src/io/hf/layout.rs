//! Fused expert layouts on disk, served to the crate's per-expert modules as slices.
//!
//! Since transformers 5, checkpoints may store the experts of a layer fused: `experts.gate_up_proj`
//! `[E, 2I, H]` (gate rows, then up rows) + `experts.down_proj` `[E, H, I]`; some ship them
//! transposed (`[E, H, 2I]` with gate columns then up columns, `[E, I, H]`); gpt-oss interleaves
//! gate and up columns (`gate_up_proj[..., ::2]` is the gate) and has `gate_up_proj_bias` `[E, 2I]`
//! and `down_proj_bias` `[E, H]`, and may ship MXFP4 `*_blocks` + `*_scales` instead of floats;
//! GraniteMoE has always stored `block_sparse_moe.input_linear.weight` `[E, 2I, H]` and
//! `output_linear.weight` `[E, H, I]`.
//!
//! [`detect`] reads the layout ONCE per checkpoint from the names and shapes (the first sparse
//! layer's tensors, read together), then checks every layer against it. A shape that fits two
//! readings is resolved by the family's known layout (gpt-oss: interleaved; GraniteMoE: rows),
//! or refused with an error naming both; a fused tensor that fits no reading is an error naming
//! it and the expected shapes. The backend then reads each fused tensor once and serves the
//! per-expert names the model asks for ([`slice`]): views of the fused storage for the rows
//! layout, one per-expert copy otherwise.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

pub(crate) use super::fuse::{family_readings, slice, Reading};
use super::{hf_name, Family};
use crate::config::ModelConfig;
use crate::error::{CheckpointErrorKind, Error, Result};
use crate::io::safetensors::HeaderEntry;

/// Expert count, model width and expert width.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Dims {
    pub(crate) experts: usize,
    pub(crate) hidden: usize,
    pub(crate) inter: usize,
}

/// Which per-expert tensor a slice is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Part {
    Gate,
    Up,
    Down,
    GateBias,
    UpBias,
    DownBias,
}

/// Where a fused tensor's values are stored.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Source {
    /// A float tensor under this name.
    Plain(String),
    /// MXFP4: `blocks` (u8 `[E, R, G, 16]`) and `scales` (E8M0 `[E, R, G]`), dequantised to
    /// `[E, 32·G, R]`.
    Mxfp4 { blocks: String, scales: String },
}

impl Source {
    /// The stored name that identifies the source (cache key, error messages).
    pub(crate) fn key(&self) -> &str {
        match self {
            Source::Plain(n) => n,
            Source::Mxfp4 { blocks, .. } => blocks,
        }
    }

    /// Every stored tensor the source reads.
    pub(crate) fn names(&self) -> Vec<String> {
        match self {
            Source::Plain(n) => vec![n.clone()],
            Source::Mxfp4 { blocks, scales } => vec![blocks.clone(), scales.clone()],
        }
    }
}

/// One per-expert tensor served from a fused one.
#[derive(Debug, Clone)]
pub(crate) struct Slice {
    pub(crate) source: Source,
    pub(crate) expert: usize,
    pub(crate) part: Part,
    pub(crate) reading: Reading,
    pub(crate) inter: usize,
}

/// What the backend serves beyond the stored names: per-expert slices of fused tensors and
/// aliases (a requested name stored under another name).
#[derive(Debug, Default)]
pub(crate) struct FusedMap {
    /// Requested name -> slice.
    pub(crate) slices: HashMap<String, Slice>,
    /// Requested name -> stored name.
    pub(crate) aliases: HashMap<String, String>,
    /// Source key -> how many slices read it (the cached tensor is dropped after the last).
    pub(crate) uses: HashMap<String, usize>,
    /// The reading detected (`None`: no fused experts).
    pub(crate) reading: Option<Reading>,
}

/// The fused tensors of one layer.
#[derive(Debug, Default)]
struct FusedLayer {
    /// The module prefix (`model.layers.N.mlp`, `model.layers.N.block_sparse_moe`).
    prefix: String,
    gate_up: Option<Source>,
    down: Option<Source>,
    gate_up_bias: Option<String>,
    down_bias: Option<String>,
}

/// The kind of a fused tensor name.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Kind {
    GateUp,
    Down,
    GateUpBias,
    DownBias,
    GateUpBlocks,
    GateUpScales,
    DownBlocks,
    DownScales,
}

const SUFFIXES: [(&str, Kind); 10] = [
    (".experts.gate_up_proj", Kind::GateUp),
    (".experts.down_proj", Kind::Down),
    (".experts.gate_up_proj_bias", Kind::GateUpBias),
    (".experts.down_proj_bias", Kind::DownBias),
    (".experts.gate_up_proj_blocks", Kind::GateUpBlocks),
    (".experts.gate_up_proj_scales", Kind::GateUpScales),
    (".experts.down_proj_blocks", Kind::DownBlocks),
    (".experts.down_proj_scales", Kind::DownScales),
    (".input_linear.weight", Kind::GateUp),
    (".output_linear.weight", Kind::Down),
];

/// `(layer, module prefix, kind)` of a fused expert tensor name.
fn classify(name: &str) -> Option<(usize, String, Kind)> {
    let rest = name.strip_prefix("model.layers.")?;
    let layer = rest.split('.').next()?.parse::<usize>().ok()?;
    SUFFIXES.iter().find_map(|(s, k)| {
        name.strip_suffix(s)
            .filter(|p| p.contains('.'))
            .map(|p| (layer, p.to_string(), *k))
    })
}

fn shape_error(file: &Path, name: &str, want: Vec<usize>, found: &[usize], msg: String) -> Error {
    Error::tensor(
        file,
        name,
        CheckpointErrorKind::Shape {
            expected: want,
            found: found.to_vec(),
        },
        msg,
    )
}

/// Groups the fused tensor names by layer; MXFP4 blocks and scales must come in pairs.
fn fused_layers(
    headers: &HashMap<String, HeaderEntry>,
    file: &Path,
) -> Result<BTreeMap<usize, FusedLayer>> {
    let mut layers: BTreeMap<usize, FusedLayer> = BTreeMap::new();
    let mut names: Vec<&String> = headers.keys().collect();
    names.sort();
    for name in names {
        let Some((l, prefix, kind)) = classify(name) else {
            continue;
        };
        let entry = layers.entry(l).or_default();
        entry.prefix = prefix;
        let n = name.clone();
        match kind {
            Kind::GateUp => entry.gate_up = Some(Source::Plain(n)),
            Kind::Down => entry.down = Some(Source::Plain(n)),
            Kind::GateUpBias => entry.gate_up_bias = Some(n),
            Kind::DownBias => entry.down_bias = Some(n),
            Kind::GateUpBlocks | Kind::DownBlocks => {
                let scales = format!("{}_scales", n.trim_end_matches("_blocks"));
                if !headers.contains_key(&scales) {
                    return Err(Error::tensor(
                        file,
                        scales.as_str(),
                        CheckpointErrorKind::Missing,
                        format!("MXFP4 tensor `{n}` has no scales: missing tensor `{scales}`"),
                    ));
                }
                let src = Some(Source::Mxfp4 { blocks: n, scales });
                if kind == Kind::GateUpBlocks {
                    entry.gate_up = src;
                } else {
                    entry.down = src;
                }
            }
            Kind::GateUpScales | Kind::DownScales => {
                let blocks = format!("{}_blocks", n.trim_end_matches("_scales"));
                if !headers.contains_key(&blocks) {
                    return Err(Error::tensor(
                        file,
                        blocks.as_str(),
                        CheckpointErrorKind::Missing,
                        format!("MXFP4 scales `{n}` have no blocks: missing tensor `{blocks}`"),
                    ));
                }
            }
        }
    }
    Ok(layers)
}

/// The logical (dequantised) shape of a source, checking an MXFP4 pair's shapes.
fn source_shape(
    src: &Source,
    headers: &HashMap<String, HeaderEntry>,
    file: &Path,
) -> Result<Vec<usize>> {
    let get = |n: &str| {
        headers.get(n).ok_or_else(|| {
            Error::tensor(
                file,
                n,
                CheckpointErrorKind::Missing,
                format!("missing tensor `{n}`"),
            )
        })
    };
    match src {
        Source::Plain(n) => Ok(get(n)?.shape.clone()),
        Source::Mxfp4 { blocks, scales } => {
            let (b, s) = (get(blocks)?, get(scales)?);
            crate::io::quant::mxfp4::dequantized_shape(
                blocks, &b.shape, &b.dtype, scales, &s.shape, &s.dtype,
            )
            .map_err(|m| Error::tensor(&b.file, blocks.as_str(), CheckpointErrorKind::Corrupt, m))
        }
    }
}

/// Finds the fused expert tensors of a checkpoint (stored `headers`, `file` for errors) of
/// `family` with configuration `cfg`, detects their layout once and maps every per-expert name
/// the model will ask for onto its slice.
pub(crate) fn detect(
    headers: &HashMap<String, HeaderEntry>,
    family: Family,
    cfg: &ModelConfig,
    file: &Path,
) -> Result<FusedMap> {
    let layers = fused_layers(headers, file)?;
    let mut map = FusedMap::default();
    let d = Dims {
        experts: cfg.moe.num_experts,
        hidden: cfg.hidden_size,
        inter: cfg.moe.intermediate_size,
    };
    let sparse: Vec<(usize, &FusedLayer)> = layers
        .iter()
        .filter(|(l, _)| **l < cfg.num_layers && cfg.is_sparse_layer(**l))
        .map(|(l, f)| (*l, f))
        .collect();
    let Some((_, first)) = sparse.first() else {
        return Ok(map);
    };
    let reading = detect_reading(first, headers, family, d, file)?;
    map.reading = Some(reading);
    for (l, layer) in &sparse {
        check_layer(layer, headers, reading, d, file)?;
        add_layer(&mut map, *l, layer, reading, d, family, headers)?;
    }
    Ok(map)
}

/// The reading of the first fused layer: the family's readings that fit its tensors' shapes.
fn detect_reading(
    layer: &FusedLayer,
    headers: &HashMap<String, HeaderEntry>,
    family: Family,
    d: Dims,
    file: &Path,
) -> Result<Reading> {
    let (accepted, known) = family_readings(family);
    let mut present = vec![];
    for (src, gate_up) in [(&layer.gate_up, true), (&layer.down, false)] {
        if let Some(s) = src {
            present.push((
                s.key().to_string(),
                source_shape(s, headers, file)?,
                gate_up,
            ));
        }
    }
    let fits = |r: Reading| {
        present
            .iter()
            .all(|(_, shape, gu)| *shape == if *gu { r.gate_up(d) } else { r.down(d) })
    };
    let candidates: Vec<Reading> = accepted.iter().copied().filter(|r| fits(*r)).collect();
    match candidates.as_slice() {
        [r] => Ok(*r),
        [] => {
            let (name, shape, gu) = present
                .iter()
                .find(|(_, s, gu)| {
                    !accepted
                        .iter()
                        .any(|r| *s == if *gu { r.gate_up(d) } else { r.down(d) })
                })
                .or(present.first())
                .cloned()
                .unwrap_or_default();
            let shapes: Vec<Vec<usize>> = accepted
                .iter()
                .map(|r| if gu { r.gate_up(d) } else { r.down(d) })
                .collect();
            Err(shape_error(
                file,
                &name,
                shapes.first().cloned().unwrap_or_default(),
                &shape,
                format!(
                    "fused expert tensor `{name}` has shape {shape:?}; with {} experts, hidden size {} and expert size {} the {family:?} layout expects {}",
                    d.experts, d.hidden, d.inter,
                    shapes.iter().map(|s| format!("{s:?}")).collect::<Vec<_>>().join(" or ")
                ),
            ))
        }
        many => match known.filter(|k| many.contains(k)) {
            Some(k) => Ok(k),
            None => {
                let name = present.first().map(|p| p.0.clone()).unwrap_or_default();
                Err(Error::tensor(
                    file,
                    name.as_str(),
                    CheckpointErrorKind::Corrupt,
                    format!(
                        "ambiguous fused expert layout: `{name}` fits both {} and {} (the {family:?} family has no known fused layout); refusing to guess",
                        many[0].describe(),
                        many[1].describe()
                    ),
                ))
            }
        },
    }
}

/// Checks one layer's fused tensors against the detected reading.
fn check_layer(
    layer: &FusedLayer,
    headers: &HashMap<String, HeaderEntry>,
    r: Reading,
    d: Dims,
    file: &Path,
) -> Result<()> {
    let mut checks: Vec<(String, Vec<usize>, Vec<usize>)> = vec![];
    for (src, want) in [(&layer.gate_up, r.gate_up(d)), (&layer.down, r.down(d))] {
        if let Some(s) = src {
            checks.push((s.key().to_string(), source_shape(s, headers, file)?, want));
        }
    }
    for (b, want) in [
        (&layer.gate_up_bias, vec![d.experts, 2 * d.inter]),
        (&layer.down_bias, vec![d.experts, d.hidden]),
    ] {
        if let Some(n) = b {
            let shape = headers.get(n).map(|h| h.shape.clone()).unwrap_or_default();
            checks.push((n.clone(), shape, want));
        }
    }
    for (name, shape, want) in checks {
        if shape != want {
            return Err(shape_error(
                file,
                &name,
                want.clone(),
                &shape,
                format!(
                    "fused expert tensor `{name}` has shape {shape:?}, expected {want:?} ({}, as detected for this checkpoint)",
                    r.describe()
                ),
            ));
        }
    }
    Ok(())
}

/// Maps the per-expert names of layer `l` onto slices of its fused tensors, and the layer's
/// other tensors stored under another module prefix onto aliases.
fn add_layer(
    map: &mut FusedMap,
    l: usize,
    layer: &FusedLayer,
    reading: Reading,
    d: Dims,
    family: Family,
    headers: &HashMap<String, HeaderEntry>,
) -> Result<()> {
    let ours = |e: usize, w: &str, kind: &str| {
        hf_name(
            family,
            &format!("model.layers.{l}.block_sparse_moe.experts.{e}.{w}.{kind}"),
        )
    };
    let sources = [
        (layer.gate_up.clone(), "w1", "weight", Part::Gate),
        (layer.gate_up.clone(), "w3", "weight", Part::Up),
        (layer.down.clone(), "w2", "weight", Part::Down),
        (
            layer.gate_up_bias.clone().map(Source::Plain),
            "w1",
            "bias",
            Part::GateBias,
        ),
        (
            layer.gate_up_bias.clone().map(Source::Plain),
            "w3",
            "bias",
            Part::UpBias,
        ),
        (
            layer.down_bias.clone().map(Source::Plain),
            "w2",
            "bias",
            Part::DownBias,
        ),
    ];
    for (src, w, kind, part) in sources {
        let Some(src) = src else { continue };
        for e in 0..d.experts {
            *map.uses.entry(src.key().to_string()).or_default() += 1;
            let slice = Slice {
                source: src.clone(),
                expert: e,
                part,
                reading,
                inter: d.inter,
            };
            let name = ours(e, w, kind);
            if let Some(h) = headers.get(&name) {
                return Err(Error::tensor(
                    &h.file,
                    name.as_str(),
                    CheckpointErrorKind::Corrupt,
                    format!(
                        "tensor `{name}` is stored twice: per expert and in fused tensor `{}`",
                        src.key()
                    ),
                ));
            }
            map.slices.insert(name, slice);
        }
    }
    // The module the family's names use (e.g. Mixtral's `block_sparse_moe`) vs the one stored
    // (transformers 5 writes fused Mixtral experts under `mlp`).
    let wanted = ours(0, "w1", "weight");
    let wanted = wanted
        .split(".experts.")
        .next()
        .unwrap_or_default()
        .to_string();
    let stored = layer.prefix.trim_end_matches(".experts").to_string();
    let fused: Vec<String> = [&layer.gate_up, &layer.down]
        .into_iter()
        .flatten()
        .flat_map(Source::names)
        .chain(layer.gate_up_bias.iter().cloned())
        .chain(layer.down_bias.iter().cloned())
        .collect();
    for name in headers.keys() {
        if let Some(rest) = name.strip_prefix(&format!("{stored}.")) {
            if !fused.contains(name) && stored != wanted {
                map.aliases.insert(format!("{wanted}.{rest}"), name.clone());
            }
        }
    }
    // GraniteMoE saved by transformers 5 with `save_original_format=False`: `router.weight`.
    if family == Family::GraniteMoe {
        let (want, have) = (
            format!("{wanted}.router.layer.weight"),
            format!("{wanted}.router.weight"),
        );
        if headers.contains_key(&have) && !headers.contains_key(&want) {
            map.aliases.insert(want, have);
        }
    }
    Ok(())
}
