//! ResNet-50 with a feature pyramid network (Lin et al., CVPR 2017), as torchvision's
//! `resnet_fpn_backbone` builds it. (Being written.)
