//! Small dense linear algebra on host `f64` buffers for the closed-form M-steps of the classic
//! mixture of experts (Jordan & Jacobs 1994, §4: weighted least squares for linear experts and
//! IRLS / Newton steps for the multinomial-logit gate).
//!
//! The systems are tiny (a few dozen unknowns), so a Cholesky factorisation with a small ridge is
//! both exact enough and dependency free. Matrices are row-major `Vec<f64>`.

use candle_core::{bail, Result};

/// Solves `(A + λ I) X = B` for symmetric positive semi-definite `A` (`p × p`) and `B` (`p × m`),
/// returning `X` (`p × m`). `λ = ridge · max(mean diag(A), 1e-300)`; when the factorisation fails
/// the ridge is multiplied by 100 and the solve retried (a few times) before giving up.
pub(crate) fn solve_spd(a: &[f64], b: &[f64], p: usize, m: usize, ridge: f64) -> Result<Vec<f64>> {
    if a.len() != p * p || b.len() != p * m {
        bail!(
            "solve_spd: expected A {p}x{p} and B {p}x{m}, got {} and {} values",
            a.len(),
            b.len()
        )
    }
    let mean_diag = (0..p).map(|i| a[i * p + i].abs()).sum::<f64>() / p.max(1) as f64;
    let scale = mean_diag.max(1e-300);
    let mut lambda = ridge.max(0.0) * scale;
    for _ in 0..8 {
        if let Some(l) = cholesky(a, p, lambda) {
            return Ok(cholesky_solve(&l, b, p, m));
        }
        lambda = if lambda == 0.0 {
            1e-12 * scale
        } else {
            lambda * 100.0
        };
    }
    bail!("solve_spd: matrix is not positive definite even with a ridge of {lambda:e}")
}

/// Lower-triangular Cholesky factor of `A + λ I`, or `None` when a pivot is not positive.
fn cholesky(a: &[f64], p: usize, lambda: f64) -> Option<Vec<f64>> {
    let mut l = vec![0.0; p * p];
    for i in 0..p {
        for j in 0..=i {
            let mut s = a[i * p + j];
            if i == j {
                s += lambda;
            }
            for k in 0..j {
                s -= l[i * p + k] * l[j * p + k];
            }
            if i == j {
                if !(s.is_finite() && s > 0.0) {
                    return None;
                }
                l[i * p + i] = s.sqrt();
            } else {
                l[i * p + j] = s / l[j * p + j];
            }
        }
    }
    Some(l)
}

fn cholesky_solve(l: &[f64], b: &[f64], p: usize, m: usize) -> Vec<f64> {
    let mut x = b.to_vec();
    for c in 0..m {
        // forward: L z = b
        for i in 0..p {
            let mut s = x[i * m + c];
            for k in 0..i {
                s -= l[i * p + k] * x[k * m + c];
            }
            x[i * m + c] = s / l[i * p + i];
        }
        // backward: Lᵀ x = z
        for i in (0..p).rev() {
            let mut s = x[i * m + c];
            for k in i + 1..p {
                s -= l[k * p + i] * x[k * m + c];
            }
            x[i * m + c] = s / l[i * p + i];
        }
    }
    x
}

/// `log Σ exp(v)` of a slice, stable; `-inf` for an empty slice or all `-inf`.
pub(crate) fn logsumexp(v: &[f64]) -> f64 {
    let m = v.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
    if !m.is_finite() {
        return m;
    }
    m + v.iter().map(|x| (x - m).exp()).sum::<f64>().ln()
}

/// Weighted multinomial-logit objective `F(W) = Σ_n Σ_k r_nk log softmax(x_n W)_k`.
///
/// `x` is `n × p`, `r` is `n × k` (non-negative soft targets; rows need not sum to one), `w` is
/// `p × k`, all row-major.
pub(crate) fn multinomial_objective(x: &[f64], r: &[f64], w: &[f64], p: usize, k: usize) -> f64 {
    let n = x.len().checked_div(p).unwrap_or(0);
    let mut z = vec![0.0; k];
    let mut f = 0.0;
    for i in 0..n {
        logits_row(&x[i * p..(i + 1) * p], w, k, &mut z);
        let lse = logsumexp(&z);
        for c in 0..k {
            let rc = r[i * k + c];
            if rc != 0.0 {
                f += rc * (z[c] - lse);
            }
        }
    }
    f
}

fn logits_row(xi: &[f64], w: &[f64], k: usize, z: &mut [f64]) {
    for (c, zc) in z.iter_mut().enumerate().take(k) {
        *zc = xi.iter().enumerate().map(|(j, xj)| xj * w[j * k + c]).sum();
    }
}

/// Above this many unknowns (`p · k`) the multinomial fit takes gradient steps instead of Newton
/// steps (the Newton system would be too large to factorise each iteration).
const NEWTON_MAX_UNKNOWNS: usize = 600;

/// Monotone ascent on [`multinomial_objective`]: up to `steps` Newton (IRLS) steps, each followed by
/// a backtracking (Armijo) line search, so `F` never decreases. Returns the final objective.
///
/// For large problems (`p · k > 600`) plain gradient ascent with the same line search is used.
pub(crate) fn multinomial_ascent(
    x: &[f64],
    r: &[f64],
    w: &mut [f64],
    p: usize,
    k: usize,
    steps: usize,
) -> Result<f64> {
    let n = x.len().checked_div(p).unwrap_or(0);
    if x.len() != n * p || r.len() != n * k || w.len() != p * k {
        bail!(
            "multinomial_ascent: inconsistent sizes (x {}, r {}, w {}, p {p}, k {k})",
            x.len(),
            r.len(),
            w.len()
        )
    }
    let mut f = multinomial_objective(x, r, w, p, k);
    if k < 2 || n == 0 {
        return Ok(f);
    }
    let newton = p * k <= NEWTON_MAX_UNKNOWNS;
    for _ in 0..steps {
        let (grad, neg_h) = multinomial_derivatives(x, r, w, p, k, newton);
        let gnorm2: f64 = grad.iter().map(|v| v * v).sum();
        if !(gnorm2.is_finite() && gnorm2 > 0.0) {
            break;
        }
        let dir = ascent_direction(x, r, &grad, neg_h, p, k)?;
        // dir[c * p + j] -> w[j * k + c]
        let slope: f64 = grad.iter().zip(&dir).map(|(a, b)| a * b).sum();
        if slope.is_nan() || slope <= 0.0 {
            break;
        }
        let Some(ft) = armijo_line_search(x, r, w, p, k, f, slope, &dir) else {
            break;
        };
        let gain = ft - f;
        f = ft;
        if gain <= 1e-12 * f.abs().max(1.0) {
            return Ok(f);
        }
    }
    Ok(f)
}

/// Gradient of [`multinomial_objective`] (index `c * p + j`) and, when `newton`, the upper blocks
/// (`l ≥ c`) of the negative Hessian (`q × q`, `q = p · k`).
fn multinomial_derivatives(
    x: &[f64],
    r: &[f64],
    w: &[f64],
    p: usize,
    k: usize,
    newton: bool,
) -> (Vec<f64>, Option<Vec<f64>>) {
    let n = x.len().checked_div(p).unwrap_or(0);
    let q = p * k;
    let mut z = vec![0.0; k];
    let mut g = vec![0.0; k];
    let mut grad = vec![0.0; q];
    let mut neg_h = newton.then(|| vec![0.0; q * q]);
    for i in 0..n {
        let xi = &x[i * p..(i + 1) * p];
        logits_row(xi, w, k, &mut z);
        let lse = logsumexp(&z);
        for c in 0..k {
            g[c] = (z[c] - lse).exp();
        }
        let ri = &r[i * k..(i + 1) * k];
        let s: f64 = ri.iter().sum();
        if s == 0.0 {
            continue;
        }
        for c in 0..k {
            let coef = ri[c] - s * g[c];
            for j in 0..p {
                grad[c * p + j] += coef * xi[j];
            }
        }
        if let Some(neg_h) = neg_h.as_mut() {
            add_neg_hessian_row(neg_h, xi, &g, s, p, k);
        }
    }
    (grad, neg_h)
}

/// Adds one sample's contribution `s · (diag(g) − g gᵀ) ⊗ x xᵀ` to the upper blocks of `neg_h`.
fn add_neg_hessian_row(neg_h: &mut [f64], xi: &[f64], g: &[f64], s: f64, p: usize, k: usize) {
    let q = p * k;
    for c in 0..k {
        for l in c..k {
            let a = s * g[c] * (if c == l { 1.0 } else { 0.0 } - g[l]);
            if a == 0.0 {
                continue;
            }
            for j in 0..p {
                let axj = a * xi[j];
                let row = (c * p + j) * q + l * p;
                for (jj, xjj) in xi.iter().enumerate() {
                    neg_h[row + jj] += axj * xjj;
                }
            }
        }
    }
}

/// The ascent direction (index `c * p + j`): the Newton step when `neg_h` holds the upper blocks
/// of the negative Hessian, otherwise the gradient scaled by an inverse curvature bound.
fn ascent_direction(
    x: &[f64],
    r: &[f64],
    grad: &[f64],
    neg_h: Option<Vec<f64>>,
    p: usize,
    k: usize,
) -> Result<Vec<f64>> {
    let q = p * k;
    if let Some(mut neg_h) = neg_h {
        // fill the lower blocks by symmetry
        for a in 0..q {
            for b in 0..a {
                neg_h[a * q + b] = neg_h[b * q + a];
            }
        }
        return solve_spd(&neg_h, grad, q, 1, 1e-6);
    }
    let n = x.len().checked_div(p).unwrap_or(0);
    // scale the gradient by the inverse curvature bound (Böhning: H ≥ -½ Σ s xxᵀ)
    let denom: f64 = (0..n)
        .map(|i| {
            let s: f64 = r[i * k..(i + 1) * k].iter().sum();
            s * x[i * p..(i + 1) * p].iter().map(|v| v * v).sum::<f64>()
        })
        .sum::<f64>()
        .max(1e-12);
    Ok(grad.iter().map(|v| 2.0 * v / denom).collect())
}

/// Backtracking (Armijo) line search along `dir` from `w` (objective `f`, directional slope
/// `slope`): on success writes the accepted point into `w` and returns its objective, otherwise
/// leaves `w` alone and returns `None`.
#[allow(clippy::too_many_arguments)]
fn armijo_line_search(
    x: &[f64],
    r: &[f64],
    w: &mut [f64],
    p: usize,
    k: usize,
    f: f64,
    slope: f64,
    dir: &[f64],
) -> Option<f64> {
    let mut t = 1.0;
    let mut trial = w.to_vec();
    for _ in 0..40 {
        for c in 0..k {
            for j in 0..p {
                trial[j * k + c] = w[j * k + c] + t * dir[c * p + j];
            }
        }
        let ft = multinomial_objective(x, r, &trial, p, k);
        if ft.is_finite() && ft >= f + 1e-4 * t * slope {
            w.copy_from_slice(&trial);
            return Some(ft);
        }
        t *= 0.5;
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn solves_small_system() -> Result<()> {
        let a = [4.0, 2.0, 2.0, 3.0];
        let b = [2.0, 1.0];
        let x = solve_spd(&a, &b, 2, 1, 0.0)?;
        assert!((4.0 * x[0] + 2.0 * x[1] - 2.0).abs() < 1e-12);
        assert!((2.0 * x[0] + 3.0 * x[1] - 1.0).abs() < 1e-12);
        Ok(())
    }

    #[test]
    fn ascent_never_decreases() -> Result<()> {
        // x = [x, 1], 3 classes with soft targets
        let x: Vec<f64> = (0..20).flat_map(|i| [i as f64 / 10.0 - 1.0, 1.0]).collect();
        let r: Vec<f64> = (0..20)
            .flat_map(|i| {
                let a = (i % 3) as f64;
                [0.2 + a * 0.1, 0.5 - a * 0.1, 0.3]
            })
            .collect();
        let mut w = vec![0.0; 6];
        let f0 = multinomial_objective(&x, &r, &w, 2, 3);
        let f1 = multinomial_ascent(&x, &r, &mut w, 2, 3, 10)?;
        assert!(f1 >= f0);
        assert!((f1 - multinomial_objective(&x, &r, &w, 2, 3)).abs() < 1e-12);
        Ok(())
    }
}
