//! The differentiable all-to-all of token rows: forward sends `send_rows[d]` rows to rank `d`;
//! backward sends the gradient of the received rows back along the reverse route (the
//! all-to-all with the send and receive counts swapped), so gradients cross ranks exactly
//! where the activations did.
//!
//! Every rank must call it (forward and, when gradients are needed, backward) in the same order;
//! the backward's collective runs on a rank whenever its graph needs the op's gradient, so the
//! callers keep the autograd graphs of all ranks alike (see
//! [`crate::dist::ExpertParallelMoe`]).

use std::sync::Arc;

use candle_core::{bail, CpuStorage, CustomOp1, DType, Device, Layout, Result, Shape, Tensor};

use super::Communicator;

/// One all-to-all of rows of width `width`: `send` rows per destination, `recv` rows per source.
#[derive(Debug, Clone)]
struct AllToAll {
    comm: Arc<dyn Communicator>,
    send: Vec<usize>,
    recv: Vec<usize>,
    width: usize,
}

impl CustomOp1 for AllToAll {
    fn name(&self) -> &'static str {
        "dist-all-to-all"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let (CpuStorage::F32(data), Some((start, end))) = (storage, layout.contiguous_offsets())
        else {
            bail!("all_to_all_rows: expects contiguous f32 rows")
        };
        let send: Vec<usize> = self.send.iter().map(|&r| r * self.width).collect();
        let (out, got) = self.comm.all_to_all_v(&data[start..end], &send)?;
        let expect: Vec<usize> = self.recv.iter().map(|&r| r * self.width).collect();
        if got != expect {
            bail!(
                "all_to_all_rows: rank {} expected {:?} values per source rank but received {:?}",
                self.comm.rank(),
                expect,
                got
            )
        }
        let rows = out.len() / self.width.max(1);
        Ok((CpuStorage::F32(out), Shape::from((rows, self.width))))
    }

    fn bwd(&self, _arg: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let back = AllToAll {
            comm: self.comm.clone(),
            send: self.recv.clone(),
            recv: self.send.clone(),
            width: self.width,
        };
        Ok(Some(grad.contiguous()?.apply_op1(back)?))
    }
}

/// Sends `send_rows[d]` consecutive rows of `rows` to rank `d` (in rank order) and returns the
/// rows received, in source-rank order, `recv_rows[s]` from rank `s` (the caller knows them:
/// they are checked against what arrives). Differentiable: the backward is the reverse
/// all-to-all of the gradient. Runs on the host in f32 (any device and float dtype in and out).
///
/// # Shapes
/// - `rows`: `(Σ send_rows, h)` -> `(Σ recv_rows, h)`
pub fn all_to_all_rows(
    rows: &Tensor,
    send_rows: &[usize],
    recv_rows: &[usize],
    comm: &Arc<dyn Communicator>,
) -> Result<Tensor> {
    let (n, width) = rows.dims2()?;
    let size = comm.size();
    if send_rows.len() != size || recv_rows.len() != size {
        bail!(
            "all_to_all_rows: {} send and {} receive counts for a world of {size} ranks",
            send_rows.len(),
            recv_rows.len()
        )
    }
    if send_rows.iter().sum::<usize>() != n {
        bail!("all_to_all_rows: send counts {send_rows:?} do not sum to the {n} rows given")
    }
    let (dev, dt) = (rows.device().clone(), rows.dtype());
    let op = AllToAll {
        comm: comm.clone(),
        send: send_rows.to_vec(),
        recv: recv_rows.to_vec(),
        width,
    };
    rows.to_device(&Device::Cpu)?
        .to_dtype(DType::F32)?
        .contiguous()?
        .apply_op1(op)?
        .to_dtype(dt)?
        .to_device(&dev)
}
