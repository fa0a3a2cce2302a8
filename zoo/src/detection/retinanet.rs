//! RetinaNet (Lin et al., ICCV 2017) on ResNet-50-FPN, as torchvision's
//! `retinanet_resnet50_fpn` builds it. (Being written.)
