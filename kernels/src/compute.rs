//! Where local work runs: the CPU (burn's flex backend) or a GPU through wgpu
//! (feature `gpu`), chosen at run time with [`DeviceChoice`].

use std::fmt;
use std::str::FromStr;
use std::sync::Arc;

use tally_protocol::prng::{CpuApplier, DirectionApplier};

use crate::{Device, KernelError};

/// The device a user asks for (`--device`, `device = ...` in scenarios).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DeviceChoice {
    /// A hardware GPU when one is found, else the CPU.
    #[default]
    Auto,
    /// The CPU.
    Cpu,
    /// A GPU, software adapters (lavapipe) included; an error if none.
    Gpu,
}

impl FromStr for DeviceChoice {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "auto" => Ok(DeviceChoice::Auto),
            "cpu" => Ok(DeviceChoice::Cpu),
            "gpu" => Ok(DeviceChoice::Gpu),
            other => Err(format!("unknown device {other:?} (auto, cpu or gpu)")),
        }
    }
}

impl fmt::Display for DeviceChoice {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            DeviceChoice::Auto => "auto",
            DeviceChoice::Cpu => "cpu",
            DeviceChoice::Gpu => "gpu",
        })
    }
}

/// The device local work runs on, once chosen.
#[derive(Clone, Debug)]
pub struct Compute {
    /// burn's device (without autodiff).
    pub device: Device,
    /// What it is, for logs and run summaries: `cpu` or the GPU adapter.
    pub description: String,
    /// Why `auto` chose what it chose, when that is worth saying.
    pub note: Option<String>,
    #[cfg(feature = "gpu")]
    gpu: Option<Arc<crate::gpu::Gpu>>,
    applier: Arc<dyn DirectionApplier>,
}

impl Compute {
    /// The CPU.
    pub fn cpu() -> Self {
        Compute {
            device: crate::cpu_device(),
            description: "cpu".to_owned(),
            note: None,
            #[cfg(feature = "gpu")]
            gpu: None,
            applier: Arc::new(CpuApplier),
        }
    }

    /// Whether this is a GPU.
    pub fn is_gpu(&self) -> bool {
        #[cfg(feature = "gpu")]
        {
            self.gpu.is_some()
        }
        #[cfg(not(feature = "gpu"))]
        {
            false
        }
    }

    /// The open GPU, if this is one.
    #[cfg(feature = "gpu")]
    pub fn gpu(&self) -> Option<&Arc<crate::gpu::Gpu>> {
        self.gpu.as_ref()
    }

    /// Where replicated rounds' shared directions are applied: the GPU's
    /// fused kernel on a GPU, the CPU code otherwise (same bits).
    /// The same applier for the life of this value, so its fallback count
    /// ([`DirectionApplier::fallbacks`]) covers every session.
    pub fn applier(&self) -> Arc<dyn DirectionApplier> {
        self.applier.clone()
    }

    /// Opens the device `choice` asks for. `gpu` with no adapter is an error;
    /// `auto` falls back to the CPU and says why in [`Compute::note`].
    pub fn open(choice: DeviceChoice) -> Result<Self, KernelError> {
        match choice {
            DeviceChoice::Cpu => Ok(Compute::cpu()),
            #[cfg(feature = "gpu")]
            DeviceChoice::Gpu | DeviceChoice::Auto => {
                use crate::gpu::{Preference, open};
                let pref = if choice == DeviceChoice::Gpu { Preference::AnyAdapter } else { Preference::HardwareOnly };
                match open(pref) {
                    Ok(g) => Ok(Compute {
                        device: g.burn_device(),
                        description: g.adapter().to_string(),
                        note: None,
                        applier: Arc::new(crate::gpu::GpuApplier::new(g.clone())),
                        gpu: Some(g),
                    }),
                    Err(e) if choice == DeviceChoice::Auto => {
                        Ok(Compute { note: Some(format!("device auto: {e}; training on the CPU")), ..Compute::cpu() })
                    }
                    Err(e) => Err(KernelError::NoGpu(e.to_string())),
                }
            }
            #[cfg(not(feature = "gpu"))]
            DeviceChoice::Gpu => {
                Err(KernelError::NoGpu("this build has no GPU support (tally-kernels feature `gpu`)".into()))
            }
            #[cfg(not(feature = "gpu"))]
            DeviceChoice::Auto => Ok(Compute {
                note: Some("device auto: this build has no GPU support; training on the CPU".into()),
                ..Compute::cpu()
            }),
        }
    }
}
