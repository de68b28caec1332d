//! Readers for the public-domain time series shipped in `data/timeseries/` (from the statsmodels
//! wheel; see `data/timeseries/SOURCES.md`) and the lag matrices of autoregressive experts, as
//! used by gated-expert forecasting (Weigend, Mangeas & Srivastava 1995, "Nonlinear gated experts
//! for time series", on yearly sunspots).
//!
//! - `sunspots.csv`: `"YEAR","SUNACTIVITY"`, yearly 1700–2008.
//! - `co2.csv`: `date,co2`, weekly Mauna Loa CO2 (ppmv) 1958-03-29 … 2001-12-29 with empty cells for
//!   missing weeks; [`co2_monthly`] averages the observed weeks of each month and linearly
//!   interpolates the months without any.

use std::path::Path;

use candle_core::{bail, Device, Result, Tensor};

fn read_rows(path: &Path) -> Result<Vec<Vec<String>>> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| candle_core::Error::Msg(format!("cannot read {}: {e}", path.display())))?;
    Ok(text
        .lines()
        .skip(1)
        .filter(|l| !l.trim().is_empty())
        .map(|l| {
            l.split(',')
                .map(|c| c.trim().trim_matches('"').to_string())
                .collect()
        })
        .collect())
}

fn parse<T: std::str::FromStr>(s: &str, path: &Path, line: usize) -> Result<T> {
    match s.parse() {
        Ok(v) => Ok(v),
        Err(_) => bail!("{}: line {}: cannot parse `{s}`", path.display(), line + 2),
    }
}

/// Reads `sunspots.csv`: `(year, yearly sunspot number)` rows in file order.
pub fn load_sunspots(path: impl AsRef<Path>) -> Result<Vec<(i32, f64)>> {
    let path = path.as_ref();
    read_rows(path)?
        .iter()
        .enumerate()
        .map(|(i, r)| {
            if r.len() < 2 {
                bail!(
                    "{}: line {}: expected YEAR,SUNACTIVITY",
                    path.display(),
                    i + 2
                )
            }
            let year: f64 = parse(&r[0], path, i)?;
            Ok((year as i32, parse(&r[1], path, i)?))
        })
        .collect()
}

/// Reads `co2.csv`: `(date as YYYYMMDD, ppmv or None when the cell is empty)` rows in file order.
pub fn load_co2_weekly(path: impl AsRef<Path>) -> Result<Vec<(u32, Option<f64>)>> {
    let path = path.as_ref();
    read_rows(path)?
        .iter()
        .enumerate()
        .map(|(i, r)| {
            let date: u32 = parse(&r[0], path, i)?;
            let v = match r.get(1).map(|s| s.as_str()) {
                None | Some("") | Some("NA") | Some("nan") => None,
                Some(s) => Some(parse::<f64>(s, path, i)?),
            };
            Ok((date, v))
        })
        .collect()
}

/// One month of a monthly series built from weekly data.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct MonthlyValue {
    /// Calendar year.
    pub year: i32,
    /// Month, 1–12.
    pub month: u32,
    /// Mean of the observed weeks, or the linear interpolation between the nearest observed
    /// months when `observed_weeks == 0`.
    pub value: f64,
    /// Number of weeks with a value in this month (0 = interpolated).
    pub observed_weeks: usize,
}

impl MonthlyValue {
    /// `year + (month − 0.5) / 12`, for plotting.
    pub fn time(&self) -> f64 {
        self.year as f64 + (self.month as f64 - 0.5) / 12.0
    }
}

/// Monthly means of weekly values, every month from the first row's to the last row's, with
/// months that have no observed week filled by linear interpolation (constant at the ends).
pub fn co2_monthly(weekly: &[(u32, Option<f64>)]) -> Result<Vec<MonthlyValue>> {
    let (Some(first), Some(last)) = (weekly.first(), weekly.last()) else {
        bail!("co2_monthly: no rows")
    };
    let month_index = |date: u32| (date / 10000) as i64 * 12 + ((date / 100) % 100) as i64 - 1;
    let (m0, m1) = (month_index(first.0), month_index(last.0));
    if m1 < m0 {
        bail!("co2_monthly: rows are not in date order")
    }
    let len = (m1 - m0 + 1) as usize;
    let mut sum = vec![0.0; len];
    let mut count = vec![0usize; len];
    for &(date, v) in weekly {
        let m = month_index(date) - m0;
        if m < 0 || m as usize >= len {
            bail!("co2_monthly: rows are not in date order ({date})")
        }
        if let Some(v) = v {
            sum[m as usize] += v;
            count[m as usize] += 1;
        }
    }
    let observed: Vec<usize> = (0..len).filter(|&i| count[i] > 0).collect();
    if observed.is_empty() {
        bail!("co2_monthly: every value is missing")
    }
    let mean = |i: usize| sum[i] / count[i] as f64;
    let mut out = Vec::with_capacity(len);
    let mut next = 0; // index into observed of the first observed month ≥ i
    for (i, &cnt) in count.iter().enumerate() {
        while next < observed.len() && observed[next] < i {
            next += 1;
        }
        let value = if cnt > 0 {
            mean(i)
        } else if next == 0 {
            mean(observed[0])
        } else if next == observed.len() {
            mean(observed[observed.len() - 1])
        } else {
            let (a, b) = (observed[next - 1], observed[next]);
            let t = (i - a) as f64 / (b - a) as f64;
            mean(a) + t * (mean(b) - mean(a))
        };
        let mi = m0 + i as i64;
        out.push(MonthlyValue {
            year: (mi / 12) as i32,
            month: (mi % 12) as u32 + 1,
            value,
            observed_weeks: cnt,
        });
    }
    Ok(out)
}

/// The lag matrix of an autoregressive model of order `lags`: row `i` predicts
/// `series[i + lags]` from `[series[i + lags − 1], …, series[i]]` (newest first).
///
/// # Shapes
/// - returns `xs` `(len − lags, lags)` and `ys` `(len − lags, 1)`, f64 on the CPU
pub fn lagged(series: &[f64], lags: usize) -> Result<(Tensor, Tensor)> {
    if lags == 0 || series.len() <= lags {
        bail!(
            "lagged: need 0 < lags < series length, got lags {lags} for {} values",
            series.len()
        )
    }
    let n = series.len() - lags;
    let mut xs = Vec::with_capacity(n * lags);
    let mut ys = Vec::with_capacity(n);
    for i in 0..n {
        for l in 1..=lags {
            xs.push(series[i + lags - l]);
        }
        ys.push(series[i + lags]);
    }
    Ok((
        Tensor::from_vec(xs, (n, lags), &Device::Cpu)?,
        Tensor::from_vec(ys, (n, 1), &Device::Cpu)?,
    ))
}
