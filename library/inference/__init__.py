"""Generation shared by gen_img and training samples: prompt-line options, job planning, samplers, network merging."""
