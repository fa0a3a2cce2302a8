//! Which layers run in INT8: a configuration, not code. The paper's default (Zhu et al., CVPR
//! 2020, Sec. 5) keeps the first convolution and the last fully connected layer in FP32 and runs
//! every other convolution and fully connected layer in INT8; rules by layer-name pattern change
//! that either way.

use crate::precision::{Int8Config, Precision};

/// The kind of a layer and its place in the model, for the policy's defaults.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LayerKind {
    /// A convolution; `first` marks the model's first one.
    Conv {
        /// Whether it is the model's first convolution.
        first: bool,
    },
    /// A fully connected layer; `last` marks the classifier.
    Linear {
        /// Whether it is the model's last layer.
        last: bool,
    },
    /// A detector's prediction layer: the convolution (or layer) that gives the class logits or
    /// box offsets of each anchor or region. It is the detector's classifier, and takes the
    /// classifier's precision: FP32 under the paper's policy unless `linear_int8`. Measured on
    /// RetinaNet learning two tree-crown tiles (120 steps, one seed each): mAP@0.5 55% with the
    /// prediction convolutions in INT8, 92% with the class logits alone in FP32, 96% with both
    /// (FP32 throughout: 95%).
    Prediction,
}

/// A rule: layers whose name matches `pattern` (`*` matches any run of characters) run at
/// `int8` or FP32.
#[derive(Debug, Clone, PartialEq)]
pub struct Rule {
    /// A layer-name pattern such as `layer3.*` or `fc`.
    pub pattern: String,
    /// Whether matching layers run in INT8.
    pub int8: bool,
}

/// The precision of every layer of a model.
#[derive(Debug, Clone, PartialEq)]
pub struct LayerPolicy {
    /// INT8 settings for the layers that run in INT8; `None` makes the whole model FP32.
    pub int8: Option<Int8Config>,
    /// Whether the first convolution runs in INT8 (the paper keeps it FP32).
    pub first_conv_int8: bool,
    /// Whether the output layers run in INT8: a classifier's last fully connected layer and a
    /// detector's prediction layers. The paper keeps the classifier FP32 and runs the others in
    /// INT8; a detector's prediction convolutions are its classifiers, and INT8 there costs a
    /// dense detector most of what it learns (see `LayerKind::Prediction`).
    pub linear_int8: bool,
    /// Rules applied after the defaults, in order; the last match wins.
    pub rules: Vec<Rule>,
}

impl LayerPolicy {
    /// Every layer FP32.
    pub fn fp32() -> Self {
        Self { int8: None, first_conv_int8: false, linear_int8: false, rules: Vec::new() }
    }

    /// The paper's INT8 policy with the given INT8 settings.
    pub fn paper(int8: Int8Config) -> Self {
        Self { int8: Some(int8), first_conv_int8: false, linear_int8: false, rules: Vec::new() }
    }

    /// The precision of layer `name` of kind `kind`.
    pub fn precision_for(&self, name: &str, kind: LayerKind) -> Precision {
        let Some(cfg) = self.int8 else { return Precision::Fp32 };
        let mut int8 = match kind {
            LayerKind::Conv { first } => !first || self.first_conv_int8,
            LayerKind::Linear { last } => !last || self.linear_int8,
            LayerKind::Prediction => self.linear_int8,
        };
        for rule in &self.rules {
            if glob(&rule.pattern, name) {
                int8 = rule.int8;
            }
        }
        if int8 { Precision::Int8(cfg) } else { Precision::Fp32 }
    }
}

/// Whether `name` matches `pattern`, where `*` matches any run of characters.
pub fn glob(pattern: &str, name: &str) -> bool {
    match pattern.split_once('*') {
        None => pattern == name,
        Some((head, rest)) => {
            let Some(tail) = name.strip_prefix(head) else { return false };
            (0..=tail.len()).any(|i| tail.is_char_boundary(i) && glob(rest, &tail[i..]))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn globs_match_like_shell_patterns() {
        assert!(glob("layer3.*", "layer3.0.conv1"));
        assert!(glob("*.shortcut.*", "layer2.0.shortcut.conv"));
        assert!(glob("fc", "fc") && !glob("fc", "fc2"));
        assert!(glob("*", "") && glob("a*b*c", "axxbyyc") && !glob("a*b*c", "axxbyy"));
    }

    #[test]
    fn the_paper_default_and_rules() {
        let p = LayerPolicy::paper(Int8Config::default());
        let (first, conv) = (LayerKind::Conv { first: true }, LayerKind::Conv { first: false });
        let (last, hidden) = (LayerKind::Linear { last: true }, LayerKind::Linear { last: false });
        assert_eq!(p.precision_for("conv1", first), Precision::Fp32);
        assert!(matches!(p.precision_for("layer1.0.conv1", conv), Precision::Int8(_)));
        assert_eq!(p.precision_for("fc", last), Precision::Fp32);
        assert!(matches!(p.precision_for("fc6", hidden), Precision::Int8(_)), "only the last linear stays FP32");
        assert_eq!(p.precision_for("head.cls.0", LayerKind::Prediction), Precision::Fp32);
        let p = LayerPolicy {
            first_conv_int8: true,
            linear_int8: true,
            rules: vec![Rule { pattern: "layer3.*".into(), int8: false }],
            ..LayerPolicy::paper(Int8Config::default())
        };
        assert!(matches!(p.precision_for("conv1", first), Precision::Int8(_)));
        assert!(matches!(p.precision_for("fc", last), Precision::Int8(_)));
        assert!(matches!(p.precision_for("head.cls.0", LayerKind::Prediction), Precision::Int8(_)));
        assert_eq!(p.precision_for("layer3.1.conv2", conv), Precision::Fp32);
        assert_eq!(LayerPolicy::fp32().precision_for("layer1.0.conv1", conv), Precision::Fp32);
        assert_eq!(LayerPolicy::fp32().precision_for("fc6", hidden), Precision::Fp32);
    }
}
