"""moeyard.runtime"""
