//! Inception v3 (Szegedy et al., CVPR 2016) in torchvision's layout, without the auxiliary
//! classifier: 23,834,568 parameters at 1000 classes, for 299x299 inputs. Every convolution is a
//! "basic conv" (convolution without bias, batch norm with epsilon 1e-3, ReLU), including the
//! factorised 1x7/7x1 and 1x3/3x1 ones. The paper (Zhu et al., CVPR 2020, Table 4) trains it in
//! INT8 on ImageNet; its default policy keeps the first convolution and the classifier in FP32.

use int8_nn::layers::{BatchNorm2d, Conv2d, Dropout, Linear};
use int8_nn::ops::{avg_pool2d, concat, global_avg_pool, max_pool2d};
use int8_nn::policy::{LayerKind, LayerPolicy};
use int8_nn::{Layer, Module, Tensor};

use crate::blocks::Builder;
use crate::{Model, Result, init};

/// A convolution, batch norm (epsilon 1e-3) and ReLU.
#[derive(Debug)]
pub struct BasicConv {
    /// The convolution.
    pub conv: Conv2d,
    /// Batch norm with the ReLU fused.
    pub bn: BatchNorm2d,
}

impl BasicConv {
    fn new(
        b: &mut Builder,
        name: &str,
        inp: usize,
        out: usize,
        k: (usize, usize),
        stride: usize,
        pad: (usize, usize),
    ) -> Result<Self> {
        let first = b.count == 0;
        Ok(Self {
            conv: b.conv_rect(&format!("{name}.conv"), inp, out, k, stride, pad, first)?,
            bn: BatchNorm2d::new(format!("{name}.bn"), out, true)?.with_eps(1e-3),
        })
    }

    /// A square `k x k` convolution with padding `pad` on every side.
    fn sq(b: &mut Builder, name: &str, inp: usize, out: usize, k: usize, stride: usize, pad: usize) -> Result<Self> {
        Self::new(b, name, inp, out, (k, k), stride, (pad, pad))
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        Ok(self.bn.forward(&self.conv.forward(x)?)?)
    }
}

impl Module for BasicConv {
    fn visit<'a>(&'a self, f: &mut dyn FnMut(Layer<'a>)) {
        self.conv.visit(f);
        self.bn.visit(f);
    }
}

/// Applies a chain of basic convs.
fn chain(convs: &[BasicConv], x: &Tensor) -> Result<Tensor> {
    let mut h = x.clone();
    for c in convs {
        h = c.forward(&h)?;
    }
    Ok(h)
}

/// 3x3 average pooling with stride 1 and padding 1 (padding counted, as torchvision).
fn avg3(x: &Tensor) -> Result<Tensor> {
    Ok(avg_pool2d(x, 3, 1, 1)?)
}

/// A module's branches, each a chain of basic convs, some after a pooling.
#[derive(Debug)]
pub struct Branch {
    /// Pool before the convs: `None`, average 3x3/1, or max 3x3/2.
    pub pool: Pool,
    /// The convs in order.
    pub convs: Vec<BasicConv>,
    /// Where the chain splits into two final convs whose outputs are concatenated (Inception E).
    pub split: Option<(BasicConv, BasicConv)>,
}

/// The pooling at the head of a branch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pool {
    /// None.
    None,
    /// 3x3 average, stride 1, padding 1.
    Avg,
    /// 3x3 max, stride 2.
    Max,
}

impl Branch {
    fn forward(&self, x: &Tensor) -> Result<Vec<Tensor>> {
        let x = match self.pool {
            Pool::None => x.clone(),
            Pool::Avg => avg3(x)?,
            Pool::Max => max_pool2d(x, 3, 2, 0)?,
        };
        let h = chain(&self.convs, &x)?;
        Ok(match &self.split {
            None => vec![h],
            Some((a, b)) => vec![a.forward(&h)?, b.forward(&h)?],
        })
    }
}

impl Module for Branch {
    fn visit<'a>(&'a self, f: &mut dyn FnMut(Layer<'a>)) {
        self.convs.visit(f);
        self.split.visit(f);
    }
}

/// An Inception module: branches whose outputs are concatenated along channels.
#[derive(Debug)]
pub struct InceptionModule {
    /// The branches, in torchvision's concatenation order.
    pub branches: Vec<Branch>,
}

impl InceptionModule {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let mut outs = Vec::new();
        for b in &self.branches {
            outs.extend(b.forward(x)?);
        }
        Ok(concat(&outs, 1)?)
    }
}

impl Module for InceptionModule {
    fn visit<'a>(&'a self, f: &mut dyn FnMut(Layer<'a>)) {
        self.branches.visit(f);
    }
}

/// A conv of a branch: name suffix, output channels, kernel, stride, padding.
type ConvSpec<'s> = (&'s str, usize, (usize, usize), usize, (usize, usize));
/// A split head: name suffix, output channels, kernel, padding (stride 1).
type HeadSpec<'s> = (&'s str, usize, (usize, usize), (usize, usize));

/// One branch of a module: a pool, a chain of convs, and maybe a split head.
struct Spec<'s> {
    pool: Pool,
    convs: Vec<ConvSpec<'s>>,
    split: Option<[HeadSpec<'s>; 2]>,
}

fn module(b: &mut Builder, name: &str, inp: usize, specs: Vec<Spec>) -> Result<InceptionModule> {
    let mut branches = Vec::new();
    for s in specs {
        let mut c = inp;
        let mut convs = Vec::new();
        for (suffix, out, k, stride, pad) in s.convs {
            convs.push(BasicConv::new(b, &format!("{name}.{suffix}"), c, out, k, stride, pad)?);
            c = out;
        }
        let split = match s.split {
            None => None,
            Some([(sa, oa, ka, pa), (sb, ob, kb, pb)]) => Some((
                BasicConv::new(b, &format!("{name}.{sa}"), c, oa, ka, 1, pa)?,
                BasicConv::new(b, &format!("{name}.{sb}"), c, ob, kb, 1, pb)?,
            )),
        };
        branches.push(Branch { pool: s.pool, convs, split });
    }
    Ok(InceptionModule { branches })
}

const K1: (usize, usize) = (1, 1);
const K3: (usize, usize) = (3, 3);
const K5: (usize, usize) = (5, 5);
const K17: (usize, usize) = (1, 7);
const K71: (usize, usize) = (7, 1);
const K13: (usize, usize) = (1, 3);
const K31: (usize, usize) = (3, 1);
const P0: (usize, usize) = (0, 0);
const P1: (usize, usize) = (1, 1);

fn spec<'s>(pool: Pool, convs: Vec<ConvSpec<'s>>) -> Spec<'s> {
    Spec { pool, convs, split: None }
}

/// Inception A (35x35): 1x1; 1x1 -> 5x5; 1x1 -> 3x3 -> 3x3; avg pool -> 1x1.
fn inception_a(b: &mut Builder, name: &str, inp: usize, pool_features: usize) -> Result<InceptionModule> {
    module(
        b,
        name,
        inp,
        vec![
            spec(Pool::None, vec![("branch1x1", 64, K1, 1, P0)]),
            spec(Pool::None, vec![("branch5x5_1", 48, K1, 1, P0), ("branch5x5_2", 64, K5, 1, (2, 2))]),
            spec(
                Pool::None,
                vec![
                    ("branch3x3dbl_1", 64, K1, 1, P0),
                    ("branch3x3dbl_2", 96, K3, 1, P1),
                    ("branch3x3dbl_3", 96, K3, 1, P1),
                ],
            ),
            spec(Pool::Avg, vec![("branch_pool", pool_features, K1, 1, P0)]),
        ],
    )
}

/// Inception B (35 -> 17): 3x3/2; 1x1 -> 3x3 -> 3x3/2; max pool.
fn inception_b(b: &mut Builder, name: &str, inp: usize) -> Result<InceptionModule> {
    module(
        b,
        name,
        inp,
        vec![
            spec(Pool::None, vec![("branch3x3", 384, K3, 2, P0)]),
            spec(
                Pool::None,
                vec![
                    ("branch3x3dbl_1", 64, K1, 1, P0),
                    ("branch3x3dbl_2", 96, K3, 1, P1),
                    ("branch3x3dbl_3", 96, K3, 2, P0),
                ],
            ),
            spec(Pool::Max, vec![]),
        ],
    )
}

/// Inception C (17x17), with factorised 7x7 convolutions of `c7` channels.
fn inception_c(b: &mut Builder, name: &str, inp: usize, c7: usize) -> Result<InceptionModule> {
    module(
        b,
        name,
        inp,
        vec![
            spec(Pool::None, vec![("branch1x1", 192, K1, 1, P0)]),
            spec(
                Pool::None,
                vec![
                    ("branch7x7_1", c7, K1, 1, P0),
                    ("branch7x7_2", c7, K17, 1, (0, 3)),
                    ("branch7x7_3", 192, K71, 1, (3, 0)),
                ],
            ),
            spec(
                Pool::None,
                vec![
                    ("branch7x7dbl_1", c7, K1, 1, P0),
                    ("branch7x7dbl_2", c7, K71, 1, (3, 0)),
                    ("branch7x7dbl_3", c7, K17, 1, (0, 3)),
                    ("branch7x7dbl_4", c7, K71, 1, (3, 0)),
                    ("branch7x7dbl_5", 192, K17, 1, (0, 3)),
                ],
            ),
            spec(Pool::Avg, vec![("branch_pool", 192, K1, 1, P0)]),
        ],
    )
}

/// Inception D (17 -> 8): 1x1 -> 3x3/2; 1x1 -> 1x7 -> 7x1 -> 3x3/2; max pool.
fn inception_d(b: &mut Builder, name: &str, inp: usize) -> Result<InceptionModule> {
    module(
        b,
        name,
        inp,
        vec![
            spec(Pool::None, vec![("branch3x3_1", 192, K1, 1, P0), ("branch3x3_2", 320, K3, 2, P0)]),
            spec(
                Pool::None,
                vec![
                    ("branch7x7x3_1", 192, K1, 1, P0),
                    ("branch7x7x3_2", 192, K17, 1, (0, 3)),
                    ("branch7x7x3_3", 192, K71, 1, (3, 0)),
                    ("branch7x7x3_4", 192, K3, 2, P0),
                ],
            ),
            spec(Pool::Max, vec![]),
        ],
    )
}

/// Inception E (8x8), with split 1x3/3x1 heads.
fn inception_e(b: &mut Builder, name: &str, inp: usize) -> Result<InceptionModule> {
    let split = |a: &'static str, c: &'static str| Some([(a, 384, K13, (0, 1)), (c, 384, K31, (1, 0))]);
    module(
        b,
        name,
        inp,
        vec![
            spec(Pool::None, vec![("branch1x1", 320, K1, 1, P0)]),
            Spec {
                pool: Pool::None,
                convs: vec![("branch3x3_1", 384, K1, 1, P0)],
                split: split("branch3x3_2a", "branch3x3_2b"),
            },
            Spec {
                pool: Pool::None,
                convs: vec![("branch3x3dbl_1", 448, K1, 1, P0), ("branch3x3dbl_2", 384, K3, 1, P1)],
                split: split("branch3x3dbl_3a", "branch3x3dbl_3b"),
            },
            spec(Pool::Avg, vec![("branch_pool", 192, K1, 1, P0)]),
        ],
    )
}

/// Inception v3.
#[derive(Debug)]
pub struct InceptionV3 {
    /// The stem: five basic convs (with two max pools, applied in `forward`).
    pub stem: Vec<BasicConv>,
    /// Mixed_5b .. Mixed_7c.
    pub mixed: Vec<(String, InceptionModule)>,
    /// Dropout before the classifier.
    pub dropout: Dropout,
    /// 2048 -> classes.
    pub fc: Linear,
}

impl InceptionV3 {
    /// Inception v3 for `classes` classes.
    pub fn new(classes: usize, policy: &LayerPolicy, seed: u64) -> Result<Self> {
        let mut b = Builder { policy, seed, count: 0 };
        let stem = vec![
            BasicConv::sq(&mut b, "Conv2d_1a_3x3", 3, 32, 3, 2, 0)?,
            BasicConv::sq(&mut b, "Conv2d_2a_3x3", 32, 32, 3, 1, 0)?,
            BasicConv::sq(&mut b, "Conv2d_2b_3x3", 32, 64, 3, 1, 1)?,
            BasicConv::sq(&mut b, "Conv2d_3b_1x1", 64, 80, 1, 1, 0)?,
            BasicConv::sq(&mut b, "Conv2d_4a_3x3", 80, 192, 3, 1, 0)?,
        ];
        let mut mixed = Vec::new();
        let mut add = |name: &str, m: InceptionModule| mixed.push((name.to_string(), m));
        add("Mixed_5b", inception_a(&mut b, "Mixed_5b", 192, 32)?);
        add("Mixed_5c", inception_a(&mut b, "Mixed_5c", 256, 64)?);
        add("Mixed_5d", inception_a(&mut b, "Mixed_5d", 288, 64)?);
        add("Mixed_6a", inception_b(&mut b, "Mixed_6a", 288)?);
        add("Mixed_6b", inception_c(&mut b, "Mixed_6b", 768, 128)?);
        add("Mixed_6c", inception_c(&mut b, "Mixed_6c", 768, 160)?);
        add("Mixed_6d", inception_c(&mut b, "Mixed_6d", 768, 160)?);
        add("Mixed_6e", inception_c(&mut b, "Mixed_6e", 768, 192)?);
        add("Mixed_7a", inception_d(&mut b, "Mixed_7a", 768)?);
        add("Mixed_7b", inception_e(&mut b, "Mixed_7b", 1280)?);
        add("Mixed_7c", inception_e(&mut b, "Mixed_7c", 2048)?);
        let (w, bias) = init::linear(classes, 2048, b.next_seed())?;
        let fc = Linear::new("fc", w, bias, policy.precision_for("fc", LayerKind::Linear { last: true }))?;
        Ok(Self { stem, mixed, dropout: Dropout::new("dropout", 0.5, b.next_seed())?, fc })
    }
}

impl Module for InceptionV3 {
    fn visit<'a>(&'a self, f: &mut dyn FnMut(Layer<'a>)) {
        self.stem.visit(f);
        for (_, m) in &self.mixed {
            m.visit(f);
        }
        self.dropout.visit(f);
        self.fc.visit(f);
    }
}

impl Model for InceptionV3 {
    fn name(&self) -> &str {
        "inceptionv3"
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let s = &self.stem;
        let h = s[2].forward(&s[1].forward(&s[0].forward(x)?)?)?;
        let h = max_pool2d(&h, 3, 2, 0)?;
        let h = s[4].forward(&s[3].forward(&h)?)?;
        let mut h = max_pool2d(&h, 3, 2, 0)?;
        for (_, m) in &self.mixed {
            h = m.forward(&h)?;
        }
        let h = self.dropout.forward(&global_avg_pool(&h)?)?;
        Ok(self.fc.forward(&h)?)
    }
}
