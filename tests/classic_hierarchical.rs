//! The hierarchical mixture of experts (Jordan & Jacobs 1994): one branch reduces to the flat
//! MoE, nested EM is monotone, and unbalanced trees train.

mod common;

use candle_core::Device;
use candle_moe::classic::{EmConfig, HierarchicalMoe, HmeNode, LinearGaussianExpert, SoftmaxGate};
use common::classic::{assert_monotone, hme_data, linear_experts, linear_moe, R};
use rand::{rngs::StdRng, SeedableRng};

/// A tree whose root has a single branch computes exactly what the flat MoE under that branch's
/// gate computes, through a whole EM run.
#[test]
fn hme_with_one_branch_reduces_to_flat_moe() -> R {
    let (xs, ys) = hme_data()?;
    let dev = Device::Cpu;
    let mut flat = linear_moe(3, 1)?;
    flat.init_random(&xs, &ys, 2.0, &mut StdRng::seed_from_u64(5))?;
    // copy the initial parameters into the tree
    let branch_gate = flat.gate().try_clone()?;
    let experts = flat
        .experts()
        .iter()
        .map(|e| e.try_clone())
        .collect::<candle_core::Result<Vec<_>>>()?;
    let mut top = SoftmaxGate::new(1, 1, &dev)?;
    top.randomize(&xs, 3.0, &mut StdRng::seed_from_u64(9))?; // a 1-way softmax is 1 whatever V
    let mut hme = HierarchicalMoe::two_level(top, vec![(branch_gate, experts)])?;
    assert_eq!(hme.n_leaves(), 3);

    let ll0_flat = flat.log_likelihood(&xs, &ys)?;
    let ll0_hme = hme.log_likelihood(&xs, &ys)?;
    assert!((ll0_flat - ll0_hme).abs() < 1e-9 * ll0_flat.abs());
    let cfg = EmConfig {
        max_iters: 25,
        tol: 0.0,
        gate_steps: 4,
    };
    let rf = flat.fit_em(&xs, &ys, &cfg)?;
    let rh = hme.fit_em(&xs, &ys, &cfg)?;
    assert_monotone(&rh, "hme");
    assert_eq!(rf.log_likelihood.len(), rh.log_likelihood.len());
    for (a, b) in rf.log_likelihood.iter().zip(&rh.log_likelihood) {
        assert!(
            (a - b).abs() < 1e-8 * a.abs().max(1.0),
            "flat {a} vs hme {b}"
        );
    }
    assert!(rf.log_likelihood[25] - rf.log_likelihood[0] > 50.0);
    let pf = flat.predict(&xs)?.flatten_all()?.to_vec1::<f64>()?;
    let ph = hme.predict(&xs)?.flatten_all()?.to_vec1::<f64>()?;
    let max_diff = pf
        .iter()
        .zip(&ph)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0, f64::max);
    assert!(max_diff < 1e-8, "predictions differ by {max_diff}");
    let gf = flat.gate_probs(&xs)?.flatten_all()?.to_vec1::<f64>()?;
    let gh = hme.leaf_probs(&xs)?.flatten_all()?.to_vec1::<f64>()?;
    assert!(gf.iter().zip(&gh).all(|(a, b)| (a - b).abs() < 1e-8));
    let hf = flat
        .responsibilities(&xs, &ys)?
        .flatten_all()?
        .to_vec1::<f64>()?;
    let hh = hme
        .leaf_posteriors(&xs, &ys)?
        .flatten_all()?
        .to_vec1::<f64>()?;
    assert!(hf.iter().zip(&hh).all(|(a, b)| (a - b).abs() < 1e-8));
    Ok(())
}

#[test]
fn two_level_hme_em_is_monotone_and_fits_four_pieces() -> R {
    let (xs, ys) = hme_data()?;
    let dev = Device::Cpu;
    let mut best = f64::NEG_INFINITY;
    let mut best_mse = f64::INFINITY;
    for seed in 0..3 {
        let branches = (0..2)
            .map(|_| Ok((SoftmaxGate::new(1, 2, &dev)?, linear_experts(2, 1, 1)?)))
            .collect::<candle_core::Result<Vec<_>>>()?;
        let mut hme = HierarchicalMoe::two_level(SoftmaxGate::new(1, 2, &dev)?, branches)?;
        hme.init_random(&xs, &ys, 2.0, &mut StdRng::seed_from_u64(seed))?;
        let report = hme.fit_em(
            &xs,
            &ys,
            &EmConfig {
                max_iters: 150,
                tol: 1e-9,
                gate_steps: 5,
            },
        )?;
        assert_monotone(&report, "two-level hme");
        let post = hme.leaf_posteriors(&xs, &ys)?;
        assert_eq!(post.dims(), &[400, 4]);
        assert!(post
            .sum(1)?
            .to_vec1::<f64>()?
            .iter()
            .all(|s| (s - 1.0).abs() < 1e-10));
        let prior = hme.leaf_probs(&xs)?;
        assert!(prior
            .sum(1)?
            .to_vec1::<f64>()?
            .iter()
            .all(|s| (s - 1.0).abs() < 1e-10));
        let ll = report.log_likelihood[report.log_likelihood.len() - 1];
        if ll > best {
            best = ll;
            let r = (hme.predict(&xs)? - &ys)?;
            best_mse = r.sqr()?.mean_all()?.to_scalar::<f64>()?;
        }
    }
    // noise variance is 0.01; a fit of all four pieces gets close to it
    assert!(best_mse < 0.03, "best HME mse {best_mse}");
    assert!(
        best / 400.0 > 0.4,
        "best mean log-likelihood {}",
        best / 400.0
    );
    Ok(())
}

/// Trees of mixed depth built from explicit `HmeNode`s train by the same nested EM; a gate whose
/// output count does not match its children is rejected.
#[test]
fn hme_accepts_unbalanced_trees() -> R {
    let (xs, ys) = hme_data()?;
    let dev = Device::Cpu;
    let leaf = || -> candle_core::Result<HmeNode<LinearGaussianExpert>> {
        Ok(HmeNode::Leaf(LinearGaussianExpert::new(1, 1, &dev)?))
    };
    let root = HmeNode::Gate {
        gate: SoftmaxGate::new(1, 2, &dev)?,
        children: vec![
            leaf()?,
            HmeNode::Gate {
                gate: SoftmaxGate::new(1, 3, &dev)?,
                children: vec![leaf()?, leaf()?, leaf()?],
            },
        ],
    };
    let mut hme = HierarchicalMoe::new(root)?;
    assert_eq!(hme.n_leaves(), 4);
    hme.init_random(&xs, &ys, 2.0, &mut StdRng::seed_from_u64(2))?;
    let report = hme.fit_em(
        &xs,
        &ys,
        &EmConfig {
            max_iters: 40,
            tol: 0.0,
            gate_steps: 3,
        },
    )?;
    assert!(assert_monotone(&report, "unbalanced hme") > 100.0);
    // a gate with the wrong number of outputs is rejected
    let bad = HmeNode::Gate {
        gate: SoftmaxGate::new(1, 3, &dev)?,
        children: vec![leaf()?, leaf()?],
    };
    assert!(HierarchicalMoe::new(bad).is_err());
    Ok(())
}
