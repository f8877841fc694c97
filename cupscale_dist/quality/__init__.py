"""`cupscale eval`: figures of an upscale against its original (PSNR, SSIM, detail, seams; FID/KID/IS/CLIP)."""
