output "bucket_name" {
  description = "The bucket: s3://<bucket_name>/<data_prefix>, .../<models_prefix>, .../<scores_prefix>."
  value       = aws_s3_bucket.this.id
}

output "bucket_arn" {
  value = aws_s3_bucket.this.arn
}

output "jobs_policy_arn" {
  description = "Attach to the role of the training / scoring / evaluation jobs (IRSA role, instance role)."
  value       = aws_iam_policy.jobs.arn
}

output "serving_policy_arn" {
  description = "Attach to the role of the Ray Serve pods / nodes (reads model bundles only)."
  value       = aws_iam_policy.serving.arn
}

output "head_instance_profile_arn" {
  description = "cluster/aws.yaml: the head node's IamInstanceProfile Arn."
  value       = one(aws_iam_instance_profile.head[*].arn)
}

output "worker_instance_profile_arn" {
  description = "cluster/aws.yaml: the worker nodes' IamInstanceProfile Arn."
  value       = one(aws_iam_instance_profile.worker[*].arn)
}
