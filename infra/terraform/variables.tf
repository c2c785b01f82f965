variable "region" {
  description = "AWS region of the bucket (and of the Ray cluster, to keep S3 traffic in-region)."
  type        = string
  default     = "us-west-2"
}

variable "bucket_name" {
  description = "Name of the S3 bucket for data, model bundles and scores (globally unique)."
  type        = string
}

variable "name_prefix" {
  description = "Prefix of the IAM policy, role and instance profile names."
  type        = string
  default     = "unusual"
}

variable "data_prefix" {
  description = "Key prefix of the input Parquet data (read by the jobs)."
  type        = string
  default     = "data/"
}

variable "models_prefix" {
  description = "Key prefix of the checkpoint bundles and training run storage (written by training, read by serving)."
  type        = string
  default     = "models/"
}

variable "scores_prefix" {
  description = "Key prefix of the batch-scoring output and evaluation reports (written by the jobs)."
  type        = string
  default     = "scores/"
}

variable "kms_key_arn" {
  description = "KMS key for SSE-KMS; empty for SSE-S3 (AES256), which needs no KMS permissions."
  type        = string
  default     = ""
}

variable "noncurrent_version_expiration_days" {
  description = "Days to keep overwritten / deleted object versions (versioning is on)."
  type        = number
  default     = 30
}

variable "force_destroy" {
  description = "Allow `terraform destroy` to delete a bucket that still holds objects."
  type        = bool
  default     = false
}

variable "create_instance_profiles" {
  description = "Create EC2 roles and instance profiles for the Ray cluster launcher (cluster/aws.yaml)."
  type        = bool
  default     = true
}

variable "tags" {
  description = "Tags for every resource."
  type        = map(string)
  default = {
    project = "unusual"
  }
}
