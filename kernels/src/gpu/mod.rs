//! The GPU through wgpu: adapter choice, burn's wgpu device for local
//! training, and the fused shared-randomness kernels ([`prng`]).
//!
//! One wgpu device per adapter and process. burn acquires it
//! (`init_with_setup`, so it is created with the features and limits burn's
//! kernels expect) and hands us the same `wgpu::Device` and queue: training
//! and the custom kernels share one device, one queue and one memory budget.
//!
//! Adapters come from Vulkan, Metal and DX12 only. wgpu's OpenGL adapter is
//! never used: burn deadlocks on it (gfx-rs/wgpu#5299). Software adapters
//! (Mesa's lavapipe, reported as device type `Cpu`) are a GPU only when asked
//! for explicitly ([`Preference::AnyAdapter`]); `auto` skips them, because on
//! such a machine burn's CPU backend is 10-20x faster.

pub mod bench;
pub mod check;
pub mod prng;

use std::fmt;
use std::sync::{Arc, Mutex};

use burn::tensor::wgpu::wgpu;
use burn::tensor::{Device, DeviceKind};

pub use prng::{GpuApplier, GpuVec};

/// Why the GPU could not be used.
#[derive(Debug, thiserror::Error)]
pub enum GpuError {
    /// No usable adapter.
    #[error("no GPU adapter found{0}")]
    NoAdapter(String),
    /// burn/cubecl could not bring the device up.
    #[error("could not open {adapter}: {message}")]
    Init {
        /// The adapter.
        adapter: String,
        /// What wgpu or burn said.
        message: String,
    },
    /// A buffer larger than the device allows.
    #[error("{what} needs {bytes} bytes, over the device's limit of {limit}")]
    TooLarge {
        /// The buffer.
        what: &'static str,
        /// Bytes asked for.
        bytes: u64,
        /// The device limit.
        limit: u64,
    },
    /// Submitting work or reading results back failed (device lost, out of
    /// memory, validation).
    #[error("GPU: {0}")]
    Device(String),
}

/// Which adapters may be chosen.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Preference {
    /// Hardware GPUs only (discrete, integrated, virtual).
    HardwareOnly,
    /// Hardware first, then software adapters such as lavapipe.
    AnyAdapter,
}

/// What an adapter is, as wgpu reports it.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct AdapterDescription {
    /// Adapter name, e.g. `NVIDIA H200` or `llvmpipe (LLVM 15.0.6, 256 bits)`.
    pub name: String,
    /// Graphics API: `Vulkan`, `Metal` or `Dx12`.
    pub backend: String,
    /// `DiscreteGpu`, `IntegratedGpu`, `VirtualGpu`, `Cpu` (software) or `Other`.
    pub device_type: String,
    /// Driver name and version.
    pub driver: String,
    /// Whether it is a software rasteriser running on the CPU.
    pub software: bool,
}

impl fmt::Display for AdapterDescription {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ({}, {}, driver {})", self.name, self.backend, self.device_type, self.driver)
    }
}

fn describe(info: &wgpu::AdapterInfo) -> AdapterDescription {
    let driver = match (info.driver.is_empty(), info.driver_info.is_empty()) {
        (false, false) => format!("{} {}", info.driver, info.driver_info),
        (false, true) => info.driver.clone(),
        (true, false) => info.driver_info.clone(),
        (true, true) => "unknown".to_owned(),
    };
    AdapterDescription {
        name: info.name.clone(),
        backend: format!("{:?}", info.backend),
        device_type: format!("{:?}", info.device_type),
        driver,
        software: info.device_type == wgpu::DeviceType::Cpu,
    }
}

/// Blocks on a wgpu future. Native wgpu resolves these on the calling
/// thread (adapter enumeration, device requests), so polling with a no-op
/// waker until ready is enough; no async runtime is needed.
fn block_on<F: std::future::Future>(fut: F) -> F::Output {
    let mut fut = std::pin::pin!(fut);
    let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
    loop {
        if let std::task::Poll::Ready(v) = fut.as_mut().poll(&mut cx) {
            return v;
        }
        std::thread::yield_now();
    }
}

/// The graphics APIs we take adapters from (never OpenGL, see the module docs).
const APIS: [(wgpu::Backend, burn::tensor::wgpu::WgpuBackend); 3] = [
    (wgpu::Backend::Vulkan, burn::tensor::wgpu::WgpuBackend::Vulkan),
    (wgpu::Backend::Metal, burn::tensor::wgpu::WgpuBackend::Metal),
    (wgpu::Backend::Dx12, burn::tensor::wgpu::WgpuBackend::Dx12),
];

/// An adapter and how to ask burn for exactly it.
#[derive(Clone, Debug)]
struct Candidate {
    desc: AdapterDescription,
    api: burn::tensor::wgpu::WgpuBackend,
    kind: DeviceKind,
    rank: u8,
}

fn candidates() -> Vec<Candidate> {
    let mut out = Vec::new();
    for (backend, api) in APIS {
        if !wgpu::Instance::enabled_backend_features().contains(backend.into()) {
            continue;
        }
        let instance = wgpu::Instance::new(wgpu::InstanceDescriptor {
            backends: backend.into(),
            ..wgpu::InstanceDescriptor::new_without_display_handle()
        });
        let infos: Vec<wgpu::AdapterInfo> =
            block_on(instance.enumerate_adapters(backend.into())).iter().map(|a| a.get_info()).collect();
        for (i, info) in infos.iter().enumerate() {
            // burn selects "the n-th adapter of this type on this API", as we count here.
            let nth = infos[..i].iter().filter(|o| o.device_type == info.device_type).count();
            let (kind, rank) = match info.device_type {
                wgpu::DeviceType::DiscreteGpu => (DeviceKind::DiscreteGpu(nth), 0),
                wgpu::DeviceType::IntegratedGpu => (DeviceKind::IntegratedGpu(nth), 1),
                wgpu::DeviceType::VirtualGpu => (DeviceKind::VirtualGpu(nth), 2),
                // burn can only address the first software adapter of an API.
                wgpu::DeviceType::Cpu if nth == 0 => (DeviceKind::Cpu, 4),
                // `Other` adapters cannot be addressed through burn's selector.
                _ => continue,
            };
            out.push(Candidate { desc: describe(info), api, kind, rank });
        }
    }
    out.sort_by_key(|c| c.rank);
    out
}

/// The adapters Tally could train on, best first.
pub fn adapters() -> Vec<AdapterDescription> {
    candidates().into_iter().map(|c| c.desc).collect()
}

/// An open GPU: burn's device for training and the same wgpu device for the
/// fused kernels.
pub struct Gpu {
    desc: AdapterDescription,
    burn: Device,
    device: wgpu::Device,
    queue: wgpu::Queue,
    kernels: prng::Kernels,
}

impl fmt::Debug for Gpu {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Gpu").field("adapter", &self.desc).finish_non_exhaustive()
    }
}

impl Gpu {
    /// The adapter.
    pub fn adapter(&self) -> &AdapterDescription {
        &self.desc
    }

    /// burn's device on this GPU (without autodiff).
    pub fn burn_device(&self) -> Device {
        self.burn.clone()
    }
}

/// GPUs opened by this process: burn registers a runtime per adapter once and
/// for all, so opening twice must return the first.
static OPENED: Mutex<Vec<Arc<Gpu>>> = Mutex::new(Vec::new());

/// Opens the best adapter `preference` allows (the same one on every call).
pub fn open(preference: Preference) -> Result<Arc<Gpu>, GpuError> {
    // A GPU this process already opened that the preference allows: no new
    // adapter enumeration (each loads the Vulkan drivers again).
    {
        let opened = OPENED.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(g) = opened.iter().find(|g| preference == Preference::AnyAdapter || !g.desc.software) {
            return Ok(g.clone());
        }
    }
    let all = candidates();
    let skipped: Vec<String> = all.iter().filter(|c| c.desc.software).map(|c| c.desc.name.clone()).collect();
    let Some(pick) = all.into_iter().find(|c| preference == Preference::AnyAdapter || !c.desc.software) else {
        let why = if skipped.is_empty() {
            " (Vulkan, Metal or DX12; is a driver installed? On Debian: mesa-vulkan-drivers libvulkan1)".to_owned()
        } else {
            format!(" other than software adapters ({})", skipped.join(", "))
        };
        return Err(GpuError::NoAdapter(why));
    };
    // A poisoned lock only means another thread panicked while opening;
    // the list itself is always valid.
    let mut opened = OPENED.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    if let Some(g) = opened.iter().find(|g| g.desc == pick.desc) {
        return Ok(g.clone());
    }
    let (burn, setup) = Device::wgpu_options()
        .device_kind(pick.kind.clone())
        .graphics_api(pick.api)
        .init_with_setup()
        .map_err(|e| GpuError::Init { adapter: pick.desc.to_string(), message: e.to_string() })?;
    let desc = describe(&setup.adapter.get_info());
    let kernels = prng::Kernels::new(&setup.device);
    let gpu = Arc::new(Gpu { desc, burn, device: setup.device, queue: setup.queue, kernels });
    opened.push(gpu.clone());
    Ok(gpu)
}

/// The open GPU whose burn device is `device` (with or without autodiff).
pub fn for_device(device: &Device) -> Option<Arc<Gpu>> {
    let plain = device.clone().without_autodiff();
    let opened = OPENED.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    opened.iter().find(|g| g.burn == plain).cloned()
}

#[cfg(test)]
mod tests;
