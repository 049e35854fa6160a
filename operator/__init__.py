"""xling.operator: a kopf operator that turns RetrievalExperiment resources into KubeRay RayJobs."""
