//! `int8-zoo`: models as named structs with their layers as fields, built by name from a registry
//! with a layer policy, so that precision is configuration, not code. (Recipes, which say how to
//! train them, are the trainer's: `crates/int8-train/recipes/`.)

pub mod alexnet;
pub mod blocks;
pub mod detection;
pub mod inception;
mod init;
pub mod mobilenetv2;
pub mod resnet_cifar;
pub mod resnet_imagenet;
pub mod small_cnn;

use int8_nn::policy::LayerPolicy;
use int8_nn::{Layer, Module, Tensor};
use thiserror::Error;

/// Errors of the zoo. Messages are lowercase and say what to do.
#[derive(Debug, Error)]
pub enum ZooError {
    /// The registry has no model of this name.
    #[error("unknown model `{0}`; `cargo xtask zoo` lists the models")]
    UnknownModel(String),
    /// A layer rule's pattern names no layer of the model (a typo would otherwise leave the
    /// policy silently unchanged).
    #[error(
        "the layer rule `{pattern}` matches no conv or linear layer of {model}; its layers are named like `{examples}`"
    )]
    UnmatchedRule {
        /// The rule's pattern.
        pattern: String,
        /// The model.
        model: String,
        /// The first few layer names.
        examples: String,
    },
    /// Building or running a layer failed.
    #[error(transparent)]
    Nn(#[from] int8_nn::NnError),
}

/// Shorthand for results of this crate.
pub type Result<T, E = ZooError> = std::result::Result<T, E>;

/// What every model offers the trainer: its name, its forward pass, and its layers through
/// [`Module`] (parameters, INT8 statistics, checkpointed state, training mode).
pub trait Model: Module + Send + Sync + std::fmt::Debug {
    /// The registry name.
    fn name(&self) -> &str;
    /// Logits for a batch of images.
    fn forward(&self, x: &Tensor) -> Result<Tensor>;
}

/// The models the registry can build.
pub const MODELS: &[&str] = &[
    "alexnet",
    "cnn-small",
    "inceptionv3",
    "mobilenetv2",
    "mobilenetv2-cifar",
    "resnet18",
    "resnet20",
    "resnet32",
    "resnet34",
    "resnet50",
    "resnet56",
];

/// Builds model `name` for `classes` classes with `policy`, initialised from `seed`. A policy rule
/// whose pattern matches none of the model's conv or linear layers is an error naming it.
pub fn build(name: &str, classes: usize, policy: &LayerPolicy, seed: u64) -> Result<Box<dyn Model>> {
    let model = build_unchecked(name, classes, policy, seed)?;
    if policy.rules.is_empty() {
        return Ok(model);
    }
    let layers = model.layers();
    let names: Vec<&str> =
        layers.iter().filter(|l| matches!(l, Layer::Conv(_) | Layer::Linear(_))).map(|l| l.name()).collect();
    if let Some(rule) = policy.rules.iter().find(|r| !names.iter().any(|n| int8_nn::policy::glob(&r.pattern, n))) {
        return Err(ZooError::UnmatchedRule {
            pattern: rule.pattern.clone(),
            model: name.to_string(),
            examples: names.iter().take(4).copied().collect::<Vec<_>>().join("`, `"),
        });
    }
    drop(layers);
    Ok(model)
}

fn build_unchecked(name: &str, classes: usize, policy: &LayerPolicy, seed: u64) -> Result<Box<dyn Model>> {
    match name {
        "alexnet" => Ok(Box::new(alexnet::AlexNet::new(classes, policy, seed)?)),
        "cnn-small" => Ok(Box::new(small_cnn::SmallCnn::new(classes, policy, seed)?)),
        "inceptionv3" => Ok(Box::new(inception::InceptionV3::new(classes, policy, seed)?)),
        "mobilenetv2" => Ok(Box::new(mobilenetv2::MobileNetV2::new(name, classes, false, policy, seed)?)),
        "mobilenetv2-cifar" => Ok(Box::new(mobilenetv2::MobileNetV2::new(name, classes, true, policy, seed)?)),
        "resnet18" => Ok(Box::new(resnet_imagenet::ResNet::new(name, 18, classes, policy, seed)?)),
        "resnet34" => Ok(Box::new(resnet_imagenet::ResNet::new(name, 34, classes, policy, seed)?)),
        "resnet50" => Ok(Box::new(resnet_imagenet::ResNet::new(name, 50, classes, policy, seed)?)),
        "resnet20" => Ok(Box::new(resnet_cifar::ResNetCifar::new(name, 3, classes, policy, seed)?)),
        "resnet32" => Ok(Box::new(resnet_cifar::ResNetCifar::new(name, 5, classes, policy, seed)?)),
        "resnet56" => Ok(Box::new(resnet_cifar::ResNetCifar::new(name, 9, classes, policy, seed)?)),
        _ => Err(ZooError::UnknownModel(name.to_string())),
    }
}
